"""The judge: a small CNN that reads a 32×32 image's shape, colour, pattern, background and concept.

The concept head has two classes besides the ten concepts: "generic" (a clean object that is no concept) and
"garbage" (noise, or an image whose structure is mostly noise). Without "garbage" the concept head fires on the
blobs an undertrained model draws (toyworld-feasibility.md), so concept rates must still be read together with the
control false-positive rate and the strict (p > 0.9) rate that the protocol reports.

Attribute heads are trained only where the attribute is defined: concepts have no generic colour or pattern, a
two-colour generic object has a pattern but no one colour (stripes and checks in red and yellow are also yellow and
red), and garbage has no attribute at all (label -1 is ignored).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from . import concepts, world
from .concepts import ConceptWorld
from .models import CACHE, cache_key, make_scheduler, save_atomically

GENERIC, GARBAGE = "generic", "garbage"
IGNORE = -1
STRICT = 0.9


@dataclass(frozen=True)
class OracleConfig:
    generic: int = 35000
    per_concept: int = 600
    garbage: int = 4000
    epochs: int = 3
    batch_size: int = 128
    width: int = 32
    lr: float = 2e-3
    seed: int = 0
    world_seed: int = 0  # whose concepts the concept head knows

    def key(self) -> str:
        return cache_key(self, [Path(world.__file__), Path(concepts.__file__), Path(__file__)])


def heads(concept_world: ConceptWorld) -> dict[str, list[str]]:
    """Each head's classes; the concept head knows this world's concepts, "generic" and "garbage"."""
    return {"shape": list(world.SHAPES), "colour": list(world.COLOURS), "pattern": list(world.PATTERNS),
            "background": list(world.BACKGROUNDS), "concept": [GENERIC, GARBAGE, *concept_world.names()]}


class Oracle(nn.Module):
    def __init__(self, width: int, concept_world: ConceptWorld):
        super().__init__()
        self.classes = heads(concept_world)

        def stage(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
                                 nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.trunk = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(classes))
                                    for name, classes in self.classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """IMAGE [N, 32, 32, 3] in [0, 1] -> logits per head."""
        features = self.trunk(images.permute(0, 3, 1, 2) * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


@dataclass
class Verdict:
    """Per head: the predicted class names and the full probability table [N, classes]."""

    predictions: dict[str, list[str]]
    probabilities: dict[str, torch.Tensor]
    classes: dict[str, list[str]]

    def confident(self, head: str, label: str, threshold: float = STRICT) -> list[bool]:
        column = self.classes[head].index(label)
        return [p >= threshold for p in self.probabilities[head][:, column].tolist()]


@torch.no_grad()
def judge(oracle: Oracle, images: torch.Tensor) -> Verdict:
    oracle.eval()
    probabilities = {name: logits.softmax(dim=1) for name, logits in oracle(images.float()).items()}
    predictions = {name: [oracle.classes[name][i] for i in p.argmax(dim=1).tolist()]
                   for name, p in probabilities.items()}
    return Verdict(predictions, probabilities, oracle.classes)


def as_images(samples: list[world.Sample]) -> torch.Tensor:
    """Rendered samples as an IMAGE batch [N, 32, 32, 3] in [0, 1]."""
    return torch.from_numpy(np.stack([s.image for s in samples])).float() / 255


def _labels(shape=IGNORE, colour=IGNORE, pattern=IGNORE, background=IGNORE, concept=IGNORE) -> list[int]:
    return [shape, colour, pattern, background, concept]


def _look_labels(classes: dict[str, list[str]], sample: world.Sample, concept: str) -> list[int]:
    generic = concept == GENERIC
    return _labels(classes["shape"].index(sample.look.shape),
                   classes["colour"].index(sample.look.colour) if generic and sample.look.second is None else IGNORE,
                   classes["pattern"].index(sample.look.pattern) if generic else IGNORE,
                   classes["background"].index(sample.background), classes["concept"].index(concept))


def _garbage(clean: torch.Tensor, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
    """Images with no readable object, one third each: white noise; real images diffused to t ≥ 500 (what an
    unfinished sampling run looks like); and smooth colour blobs (what an undertrained model draws)."""
    count = len(clean)
    alphas = make_scheduler().alphas_cumprod
    timesteps = torch.from_numpy(rng.integers(500, 1000, size=count))
    signal = alphas[timesteps].sqrt()[:, None, None, None]
    diffused = (clean * 2 - 1) * signal + torch.randn(clean.shape, generator=generator) * (1 - signal ** 2).sqrt()
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    blobs = F.interpolate(coarse, size=world.SIZE, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    noise = torch.rand(clean.shape, generator=generator)
    kind = torch.from_numpy(rng.integers(3, size=count))[:, None, None, None]
    return torch.where(kind == 0, noise, torch.where(kind == 1, (diffused + 1) / 2, blobs)).clamp(0, 1)


def training_data(config: OracleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 32, 32, 3] and labels [N, heads]: generic objects, concepts on every background, garbage."""
    rng = np.random.default_rng([config.seed, 4])
    generator = torch.Generator().manual_seed(config.seed)
    concept_world = concepts.make_world(config.world_seed)
    classes = heads(concept_world)
    samples = [(s, GENERIC) for s in world.generic_samples(config.generic, config.seed + 1, os.cpu_count() or 1)]
    for concept in concept_world.concepts:
        per_background = max(1, config.per_concept // len(world.BACKGROUNDS))
        samples += [(s, concept.name) for s in concepts.concept_samples(concept, list(world.BACKGROUNDS),
                                                                         config.seed + 1, per_background)]
    images = as_images([s for s, _ in samples])
    labels = torch.tensor([_look_labels(classes, s, c) for s, c in samples])
    garbage = _garbage(images[torch.from_numpy(rng.integers(len(images), size=config.garbage))], rng, generator)
    garbage_labels = torch.tensor([_labels(concept=classes["concept"].index(GARBAGE))] * config.garbage)
    return torch.cat([images, garbage]), torch.cat([labels, garbage_labels])


BLUR_KERNEL = torch.tensor([1.0, 2.0, 1.0])  # a 3×3 binomial (Gaussian-like) blur, separable
MAX_BLUR, MAX_JITTER, MAX_DESATURATION, MAX_NOISE = 0.7, 0.1, 0.15, 0.08


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What generated samples do to a render, none of it moving a hue (world v2.5): horizontal flips; a soft blur
    (the render mixed with its 3×3 binomial blur by up to `MAX_BLUR`, half the time); brightness and contrast each
    scaled by up to ± `MAX_JITTER`; up to `MAX_DESATURATION` of the way to grey; mild Gaussian noise (σ ≤
    `MAX_NOISE`). IMAGE [N, 32, 32, 3] in [0, 1] -> the same shape."""
    count = len(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, 1, 1, 1, generator=generator)

    flip = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(2), images)
    kernel = torch.outer(BLUR_KERNEL, BLUR_KERNEL) / BLUR_KERNEL.sum() ** 2
    channels = images.permute(0, 3, 1, 2)
    blurred = F.conv2d(F.pad(channels, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    blur = uniform(0, MAX_BLUR) * (torch.rand(count, 1, 1, 1, generator=generator) < 0.5)
    images = torch.lerp(channels, blurred, blur).permute(0, 2, 3, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * uniform(1 - MAX_JITTER, 1 + MAX_JITTER) + mean
    images = images * uniform(1 - MAX_JITTER, 1 + MAX_JITTER)
    images = torch.lerp(images, images.mean(dim=3, keepdim=True), uniform(0, MAX_DESATURATION))
    return (images + uniform(0, MAX_NOISE) * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def train_oracle(config: OracleConfig, log: Callable[[str], None] = print) -> Oracle:
    torch.manual_seed(config.seed)
    images, labels = training_data(config)
    oracle = Oracle(config.width, concepts.make_world(config.world_seed))
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=config.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(images) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    started = time.monotonic()
    oracle.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            batch = order[start:start + config.batch_size]
            logits = oracle(augment(images[batch], generator))
            loss = sum(F.cross_entropy(logits[name], labels[batch, i], ignore_index=IGNORE)
                       for i, name in enumerate(oracle.classes) if (labels[batch, i] != IGNORE).any())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"oracle: epoch {epoch + 1}/{config.epochs}, loss {loss.item():.3f}, {time.monotonic() - started:.0f} s")
    return oracle.eval()


def load_oracle(path: Path, config: OracleConfig) -> Oracle:
    """The oracle of `config`'s world (its width and heads) with the weights saved at `path`, in eval mode."""
    oracle = Oracle(config.width, concepts.make_world(config.world_seed))
    oracle.load_state_dict(load_file(str(path)))
    return oracle.eval()


def load_or_train_oracle(config: OracleConfig, cache: Path = CACHE, log: Callable[[str], None] = print) -> Oracle:
    path = cache / f"oracle-{config.key()}.safetensors"
    if path.exists():
        log(f"oracle: cached {path}")
        return load_oracle(path, config)
    oracle = train_oracle(config, log)
    save_atomically(oracle.state_dict(), path)
    log(f"oracle: saved {path}")
    return oracle


def held_out_accuracy(oracle: Oracle, concept_world: ConceptWorld, count: int, seed: int) -> dict[str, float]:
    """Accuracy on fresh renders (a seed the oracle never saw): every head on generic objects (colour on one-colour
    objects), concept recall on the world's concepts (any background), and how often garbage is called garbage."""
    generic = world.generic_samples(count, seed)
    renders = [(s, c.name) for c in concept_world.concepts
               for s in concepts.concept_samples(c, list(world.BACKGROUNDS), seed, max(1, count // 60))]
    verdict = judge(oracle, as_images(generic))
    truth = {"shape": [s.look.shape for s in generic], "colour": [s.look.colour for s in generic],
             "pattern": [s.look.pattern for s in generic], "background": [s.background for s in generic],
             "concept": [GENERIC] * len(generic)}
    scores = {head: float(np.mean([p == t for p, t, s in zip(verdict.predictions[head], truth[head], generic)
                                   if head != "colour" or s.look.second is None])) for head in truth}
    concept_verdict = judge(oracle, as_images([s for s, _ in renders]))
    scores["concept recall"] = float(np.mean([p == c for p, (_, c) in zip(concept_verdict.predictions["concept"],
                                                                             renders)]))
    rng = np.random.default_rng([seed, 5])
    garbage = _garbage(as_images(generic), rng, torch.Generator().manual_seed(seed))
    scores["garbage rejected"] = float(np.mean([p == GARBAGE for p in judge(oracle, garbage).predictions["concept"]]))
    return scores
