"""Automatic regions in the toy world (issue #31): cidm's concepts composed with no boxes, each concept's region
found from its tokens' cross-attention in a probe at the start of the same sampling run (cidm.auto_regions),
against the same prompts with boxes.

    python -m benchmarks.toyworld.auto_regions --world-seed 0 --train   # train cidm's 10 tasks once (cached)
    python -m benchmarks.toyworld.auto_regions --world-seed 0           # the sweep and the report

The tasks are the protocol's cidm tasks (`protocol.learn`, the product's trainer and consolidation, the toy world
v2.6 settings), trained once and kept in the cache under a key of the configurations and the training code
(`TRAINING_SOURCES`), so that the probe's settings can be swept without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cidm.train import TrainedTask  # noqa: E402

from benchmarks.toyworld import models, protocol, run  # noqa: E402

# What decides the trained tasks: the trainer, its consolidation and LoRA math, the training data and tokens, and
# the toy world's models and concepts. Sampling code (routing, regions, the probe) is not among them.
TRAINING_SOURCES = ("cidm/train.py", "cidm/consolidation.py", "cidm/adapters.py", "cidm/data.py", "cidm/tokens.py",
                    "cidm/layers.py", "benchmarks/toyworld/models.py", "benchmarks/toyworld/world.py",
                    "benchmarks/toyworld/concepts.py", "benchmarks/toyworld/protocol.py")
METHOD = "cidm"


def tasks_key(configs: tuple) -> str:
    base_config, oracle_config, protocol_config = configs
    digest = hashlib.sha256(f"{base_config.key()} {oracle_config.key()}".encode())
    settings = {k: v for k, v in dataclasses.asdict(protocol_config).items() if k != "methods"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for source in TRAINING_SOURCES:
        digest.update((REPO / source).read_bytes())
    return digest.hexdigest()[:16]


def save_tasks(learned: list[protocol.LearnedConcept], path: Path) -> None:
    tensors = {}
    for index, item in enumerate(learned):
        tensors[f"{index}/embeddings"] = item.task.embeddings
        tensors[f"{index}/features"] = item.task.features
        for (layer, proj), (down, up) in item.task.lora.items():
            tensors[f"{index}/lora/{layer}/{proj}/down"] = down
            tensors[f"{index}/lora/{layer}/{proj}/up"] = up
    models.save_atomically(tensors, path)


def load_tasks(setup: protocol.Setup, path: Path, count: int) -> list[protocol.LearnedConcept]:
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
        learned.append(protocol.LearnedConcept(concept, protocol.concept_tokens(concept), task, True))
    return learned


def learned_tasks(setup: protocol.Setup, configs: tuple, cache: Path, log) -> list[protocol.LearnedConcept]:
    """cidm's tasks, one after the other as the protocol trains them, from the cache or trained now."""
    config = configs[2]
    path = cache / f"auto-regions-tasks-{tasks_key(configs)}.safetensors"
    if path.exists():
        log(f"tasks from {path}")
        return load_tasks(setup, path, config.tasks)
    learned = []
    for index in range(config.tasks):
        _, item = protocol.learn(setup, index, learned, METHOD, config)
        learned.append(item)
        log(f"trained task {index + 1}/{config.tasks} ({item.concept.name})")
    save_tasks(learned, path)
    log(f"tasks kept in {path}")
    return learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration: checks the harness end to end")
    parser.add_argument("--train", action="store_true", help="train (or find) the tasks, and stop")
    parser.add_argument("--cache", type=Path, default=models.CACHE)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    context, configs, _ = run.setup(args.smoke, args.cache, args.threads or (1 if args.smoke else None), print,
                                    args.world_seed)
    learned_tasks(context, configs, args.cache, print)
    if args.train:
        return
    torch.manual_seed(0)


if __name__ == "__main__":
    main()
