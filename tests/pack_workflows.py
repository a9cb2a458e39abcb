"""Workflow builders and file checks shared by the integration tests."""

import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from comfy_host import Graph

CIFC = Path(os.environ.get("CIDM_CIFC", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifc"))
CKPT = "cidm_mini_sd15.safetensors"
LIBRARY = "continual"
TRAIN_DEFAULTS = dict(tokens="", class_words="", method="cidm", template="object", steps=3, lora_lr=1e-2,
                      embedding_lr=1e-3, rank=4, alpha=1.0, orthogonal_weight=0.1, shared_weight=0.01,
                      clora_lambda=1.0e6, resolution=64, batch_size=1, seed=0, save_every=0, resume=False,
                      gradient_checkpointing=False)


def stage(workspace: Path, concept: str, subfolder: str | None = None) -> str:
    """Copies a CIFC concept into the server's input folder; without the dataset, draws a stand-in concept."""
    target = workspace / "input" / "cifc" / (subfolder or concept)
    if not target.exists():
        target.mkdir(parents=True)
        if (CIFC / "images" / concept).is_dir():
            for folder in ("images", "caption"):
                for file in (CIFC / folder / concept).iterdir():
                    shutil.copy2(file, target / file.name)
        else:
            draw_concept(target, concept)
    return f"cifc/{subfolder or concept}"


def draw_concept(folder: Path, concept: str, count: int = 4) -> None:
    """A distinctive coloured shape on varied backgrounds, with captions that name the concept."""
    rng = random.Random(concept)
    colour = tuple(rng.randrange(256) for _ in range(3))
    for index in range(count):
        image = Image.new("RGB", (96, 80), tuple(rng.randrange(256) for _ in range(3)))
        left, top = rng.randrange(10, 40), rng.randrange(10, 30)
        ImageDraw.Draw(image).ellipse((left, top, left + 40, top + 40), fill=colour)
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a photo of a {concept} on a plain background")


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
