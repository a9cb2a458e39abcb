"""Workflow builders and file checks shared by the integration tests."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from comfy_host import Graph

CKPT = "cidm_mini_sd15.safetensors"
LIBRARY = "continual"
TRAIN_DEFAULTS = dict(tokens="", class_words="", method="cidm", template="object", steps=3, lora_lr=1e-2,
                      embedding_lr=1e-3, rank=4, alpha=1.0, orthogonal_weight=0.1, shared_weight=0.01,
                      clora_lambda=1.0, resolution=64, batch_size=1, seed=0, save_every=0, resume=False,
                      gradient_checkpointing=False)


def train_graph(library: str, concept: str, folder: str, ckpt: str = CKPT, **overrides):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    trained = graph.add("CIDM_TrainConceptIncrement", model=checkpoint[0], clip=checkpoint[1], vae=checkpoint[2],
                        library=lib[0], concept=concept, folder=folder, **{**TRAIN_DEFAULTS, **overrides})
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
