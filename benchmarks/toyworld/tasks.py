"""A method's trained tasks in the toy world, kept in the cache so that harnesses which only sample (automatic
regions, the evaluation node's validity check) need not train again.

The tasks are the protocol's (`protocol.learn`: the product's trainer and consolidation, the toy world v2.6
settings), trained one after the other and kept under a key of the configurations, the method and the training code
(`TRAINING_SOURCES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file

from cidm.train import TrainedTask

from . import models, protocol, run

REPO = Path(__file__).resolve().parents[2]
# What decides the trained tasks: the trainer, its consolidation and LoRA math, the training data and tokens, and
# the toy world's models and concepts. Sampling code (routing, regions, the probe) is not among them.
TRAINING_SOURCES = ("cidm/train.py", "cidm/consolidation.py", "cidm/adapters.py", "cidm/data.py", "cidm/tokens.py",
                    "cidm/layers.py", "benchmarks/toyworld/models.py", "benchmarks/toyworld/world.py",
                    "benchmarks/toyworld/concepts.py", "benchmarks/toyworld/protocol.py")


def tasks_key(configs: tuple, method: str = "cidm") -> str:
    base_config, oracle_config, protocol_config = configs
    digest = hashlib.sha256(f"{base_config.key()} {oracle_config.key()} {method}".encode())
    settings = {k: v for k, v in dataclasses.asdict(protocol_config).items() if k != "methods"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for source in TRAINING_SOURCES:
        digest.update((REPO / source).read_bytes())
    return digest.hexdigest()[:16]


def tasks_path(configs: tuple, cache: Path, method: str = "cidm") -> Path:
    """Where `method`'s tasks are kept (earlier sessions kept cidm's as auto-regions-tasks-<key>; pass such a file
    with --tasks)."""
    return cache / f"tasks-{method}-{tasks_key(configs, method)}.safetensors"


def save_tasks(learned: list[protocol.LearnedConcept], path: Path) -> None:
    tensors = {}
    for index, item in enumerate(learned):
        tensors[f"{index}/embeddings"] = item.task.embeddings
        tensors[f"{index}/features"] = item.task.features
        for (layer, proj), (down, up) in item.task.lora.items():
            tensors[f"{index}/lora/{layer}/{proj}/down"] = down
            tensors[f"{index}/lora/{layer}/{proj}/up"] = up
    models.save_atomically(tensors, path)


def load_tasks(setup: protocol.Setup, path: Path, count: int, method: str = "cidm") -> list[protocol.LearnedConcept]:
    """The first `count` tasks kept in `path`, prompted as `method` prompts them (with or without the class
    word)."""
    tensors = load_file(path)
    learned = []
    for index in range(count):
        lora = {}
        for key, value in tensors.items():
            parts = key.split("/")
            if parts[0] == str(index) and parts[1] == "lora" and parts[4] == "down":
                layer, proj = int(parts[2]), parts[3]
                lora[(layer, proj)] = (value, tensors[f"{index}/lora/{layer}/{proj}/up"])
        task = TrainedTask(lora, tensors[f"{index}/embeddings"], tensors[f"{index}/features"], [], None, 0.0)
        concept = setup.world.concepts[index]
        learned.append(protocol.LearnedConcept(concept, protocol.concept_tokens(concept), task,
                                               protocol.consolidator_of(method).class_word_in_prompt))
    return learned


def learned_tasks(setup: protocol.Setup, configs: tuple, cache: Path, log,
                  method: str = "cidm") -> list[protocol.LearnedConcept]:
    """`method`'s tasks, one after the other as the protocol trains them, from the cache or trained now."""
    config = configs[2]
    path = tasks_path(configs, cache, method)
    if path.exists():
        log(f"{method} tasks from {path}")
        return load_tasks(setup, path, config.tasks, method)
    learned = []
    for index in range(config.tasks):
        _, item = protocol.learn(setup, index, learned, method, config)
        learned.append(item)
        log(f"{method}: trained task {index + 1}/{config.tasks} ({item.concept.name})")
    save_tasks(learned, path)
    log(f"{method} tasks kept in {path}")
    return learned


def add_harness_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """The options every sampling harness takes: world seed, smoke, cache, results folder, threads."""
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration: checks the harness end to end")
    parser.add_argument("--cache", type=Path, default=models.CACHE)
    parser.add_argument("--out", type=Path, help=f"results folder (default {results})")
    parser.add_argument("--threads", type=int)


def harness_setup(args: argparse.Namespace) -> tuple[protocol.Setup, tuple]:
    """(the toy world's setup, the configurations) for a harness's parsed arguments (`add_harness_arguments`)."""
    context, configs, _ = run.setup(args.smoke, args.cache, args.threads or (1 if args.smoke else None), print,
                                    args.world_seed)
    return context, configs


def method_tasks(setup: protocol.Setup, configs: tuple, cache: Path, method: str,
                 given: Path | None) -> tuple[list[protocol.LearnedConcept], str]:
    """(`method`'s tasks, the name of the file they come from): `given`, else the cache's for the current training
    code (trained now when missing). The name is keyed before any training."""
    name = (given or tasks_path(configs, cache, method)).name
    if given:
        return load_tasks(setup, given, configs[2].tasks, method), name
    return learned_tasks(setup, configs, cache, print, method), name
