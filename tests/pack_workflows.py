"""Workflow builders and file checks shared by the integration tests."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from comfy_host import Graph

CKPT = "cidm_mini_sd15.safetensors"
LIBRARY = "continual"
# CPU-sized Concept Training Options for tests (the node defaults train at the model family's native size).
TRAIN_OPTIONS = dict(tokens="", class_words="", template="object", lora_lr=1e-2, embedding_lr=1e-3, rank=4,
                     multiplier=1.0, orthogonal_weight=0.1, shared_weight=0.01, clora_lambda=1.0, resolution=64,
                     batch_size=1, training_seed=0, save_every=0, resume=False, gradient_checkpointing=False,
                     preview_every=0, token_slots="family default")


def add_trainer(graph: Graph, checkpoint, library, concept: str, folder: str = "", method: str = "cidm",
                steps: int = 3, images=None, **options):
    """Train Concept Increment fed by a Concept Training Options node with the test settings plus `options`."""
    settings = graph.add("CIDM_ConceptTrainingOptions", **{**TRAIN_OPTIONS, **options})
    extra = {} if images is None else {"images": images}
    return graph.add("CIDM_TrainConceptIncrement", model=checkpoint[0], clip=checkpoint[1], vae=checkpoint[2],
                     library=library, concept=concept, method=method, steps=steps, folder=folder,
                     options=settings[0], **extra)


def train_graph(library: str, concept: str, folder: str, ckpt: str = CKPT, **settings):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    trained = add_trainer(graph, checkpoint, lib[0], concept, folder, **settings)
    graph.add("SaveImage", images=trained[1], filename_prefix=f"loss_{concept}")
    return graph


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file a library reader uses (the lock and resume side files are not part of a version)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*"))
            if p.is_file() and p.name != ".lock"}


def library_root(comfy, name: str) -> Path:
    return comfy.workspace / "models" / "cidm" / name


def pixels(comfy, entry) -> np.ndarray:
    (path,) = comfy.output_files(entry)
    return np.asarray(Image.open(path), dtype=np.int16)
