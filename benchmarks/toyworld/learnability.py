"""Why a concept is not learned alone: one concept's own LoRA under changed training settings, or with its look
swapped for a generic one the base model already draws, judged as the upper bound judges it.

    python -m benchmarks.toyworld.learnability --world-seed 0 --concept bulo --set lora_lr=1e-4 --set steps=600
    python -m benchmarks.toyworld.learnability --world-seed 0 --concept bulo --generic-look circle,solid,red
    python -m benchmarks.toyworld.learnability --world-seed 0 --concept pell --protocol upper_bound_samples_per_prompt=3

Prints the oracle's accuracy (the concept named), the shapes and colours it saw, and the mean training loss over the
first and last 50 steps, and writes the samples to `<out>/learnability-<concept>.png`. With `--generic-look` the
concept's training images show that generic object instead (a control: the training loop keeps what the base model
can draw), and the accuracy is replaced by the oracle's reading of shape and colour. `--set` takes `TrainingConfig`
fields (not `seed`, which the protocol sets per task: `--protocol seed=N` changes it) and `--protocol` the numeric
`ProtocolConfig` fields (images per concept, samples per prompt, sampling steps, guidance) and its sampler
(`--protocol sampler=dpm++2m`, a key of `protocol.SAMPLERS`); the protocol's own are the defaults. The probe trains
and judges as the upper bound does (`protocol.upper_bound_judging`): the same LoRA and the same 72 samples by default (12 seeds per background; `--protocol upper_bound_samples_per_prompt=N` changes
it), with the accuracy's binomial standard error beside it (± 0.04 at 0.85). Nothing is cached.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path

from . import models, protocol, report, run, world
from .concepts import Concept
from .oracle import judge


def replaced(settings, overrides: dict[str, str]):
    """A dataclass of settings with some fields given as text, each cast to its field's type."""
    return dataclasses.replace(settings, **{key: type(getattr(settings, key))(value) for key, value in overrides.items()})


def probe(setup: protocol.Setup, config: protocol.ProtocolConfig, name: str, overrides: dict[str, str],
          generic_look: world.Look | None = None):
    """(scores, oracle verdict, learned concept, samples) of one concept trained alone with `overrides`."""
    index = setup.world.names().index(name)
    concepts = list(setup.world.concepts)
    if generic_look is not None:
        concepts[index] = Concept(name, generic_look, concepts[index].control)
    probed = protocol.Setup(setup.base, setup.oracle, dataclasses.replace(setup.world, concepts=tuple(concepts)))
    config = dataclasses.replace(config, training=replaced(config.training, overrides))
    _, item = protocol.learn(probed, index, [], "finetune", config)
    scores, images = protocol.judge_concept(protocol.Composer(probed, [item], config, mode="fixed"), item, None,
                                            protocol.upper_bound_judging(config), setup.oracle)
    return scores, judge(setup.oracle, images), item, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--concept", required=True, help="a concept name of the world")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainingConfig field for this probe, e.g. lora_lr=1e-4 (repeatable)")
    parser.add_argument("--protocol", action="append", default=[], metavar="FIELD=VALUE",
                        help="a numeric ProtocolConfig field or the sampler, e.g. sampling_steps=20 or sampler=dpm++2m")
    parser.add_argument("--generic-look", metavar="SHAPE,PATTERN,COLOUR",
                        help="train on this generic object instead of the concept's look")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=models.CACHE)
    parser.add_argument("--out", type=Path, default=run.RESULTS)
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    if "seed" in overrides:  # protocol.learn sets TrainingConfig.seed itself, so this one would be dropped silently
        parser.error("--set seed: the protocol seeds task i's training with ProtocolConfig.seed + i, so this "
                     "setting would be ignored; use --protocol seed=N")
    setup, (_, _, config), _ = run.setup(False, args.cache, args.threads, print, args.world_seed)
    config = replaced(config, dict(item.split("=", 1) for item in args.protocol))
    look = None
    if args.generic_look:
        shape, pattern, colour = args.generic_look.split(",")
        look = world.Look(shape=shape, pattern=pattern, colour=colour, second=None, period=0.5)
    scores, verdict, item, images = probe(setup, config, args.concept, overrides, look)
    losses = item.task.losses
    read = {head: collections.Counter(verdict.predictions[head]).most_common(3) for head in ("shape", "pattern",
                                                                                          "colour")}
    accuracy, count = scores["acc"], len(images)
    print(f"{args.concept} {overrides or 'protocol settings'}{' as ' + args.generic_look if look else ''}"
          f"{' ' + ' '.join(args.protocol) if args.protocol else ''}: acc {accuracy:.2f} ± "
          f"{report.mean_rate_error([accuracy], count):.2f} ({count} samples), strict {scores['strict']:.2f}, "
          f"read {read}, loss first/last 50 steps "
          f"{sum(losses[:50]) / len(losses[:50]):.3f}/{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report.sample_grid({args.concept: images}, len(images)).save(args.out / f"learnability-{args.concept}.png")


if __name__ == "__main__":
    main()
