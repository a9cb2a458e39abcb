"""Does the oracle call a concept only the concept? Its specificity on each concept's nearest generic looks, and its
reading of kept samples, beside another oracle's.

    python -m benchmarks.toyworld.judge_check --world-seed 0
    python -m benchmarks.toyworld.judge_check --world-seed 0 --against OLD_ORACLE.safetensors \
        --samples ~/.cache/cidm-comfyui/toyworld/protocol-<key>/upper-bound.safetensors

A concept's neighbours are the generic looks one step from it: the same shape and checks with one of its two colours
replaced (by any colour the generic world pairs with the other one), or the same two colours in another texture.
The generic world draws them, so the base model renders them, and a judge that calls them the concept is lenient.
Printed per oracle: the held-out accuracy (`oracle.held_out_accuracy`); how often neighbour renders (clean, and
through the oracle's training augmentation) and the base model's samples of neighbour prompts and of random generic
prompts are called their concept, or any concept; and, with `--samples`, each concept's accuracy on kept samples
(a method's or the upper bound's `<method>.safetensors` in the protocol cache). Nothing is written, except that a
world's oracle or the base model, when not cached yet, is built and cached as a run would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import concepts, models, oracle, protocol, run, world
from .concepts import ConceptWorld
from .world import Look

NEIGHBOUR_BACKGROUNDS = ("gray", "navy", "white")  # for the base model's samples of neighbour prompts
RENDERS_PER_NEIGHBOUR = 6  # one per background
GENERIC_PROMPTS = 120


def neighbours(look: Look) -> list[Look]:
    """The generic looks one step from a two-colour concept look: one colour replaced (keeping the world's minimum
    colour distance), or the texture replaced; only those the generic world draws (not `world.held_out`)."""
    pairs = []
    for index in (0, 1):
        for colour in world.COLOURS:
            pair = [look.colour, look.second]
            if colour not in pair:
                pair[index] = colour
                pairs.append(pair)
    found = [Look(look.shape, look.pattern, first, second, look.period) for first, second in pairs
             if np.linalg.norm(np.subtract(world.COLOURS[first], world.COLOURS[second])) >= world.MIN_COLOUR_DISTANCE]
    found += [Look(look.shape, pattern, look.colour, look.second, look.period)
              for pattern in world.TWO_COLOUR_PATTERNS if pattern != look.pattern]
    return [n for n in found if not world.held_out(n)]


def called(verdict: oracle.Verdict, owners: list[str]) -> tuple[float, float]:
    """(share called its owner concept, share called any concept)."""
    predictions = verdict.predictions["concept"]
    return (float(np.mean([p == o for p, o in zip(predictions, owners)])),
            float(np.mean([p not in (oracle.GENERIC, oracle.GARBAGE) for p in predictions])))


def shares(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} / {pair[1]:.3f}"


def neighbour_renders(concept_world: ConceptWorld, seed: int) -> tuple[torch.Tensor, list[str]]:
    """IMAGE [N, 32, 32, 3] of every concept's neighbours, each on every background, and the concept of each."""
    rng = np.random.default_rng([seed, 6])
    backgrounds = list(world.BACKGROUNDS)
    owned = [(n, c.name, backgrounds[k % len(backgrounds)]) for c in concept_world.concepts
             for n in neighbours(c.look) for k in range(RENDERS_PER_NEIGHBOUR)]
    images = world.render_many([(look, background, world.random_placement(rng)) for look, _, background in owned])
    return (oracle.as_images([world.Sample(image, look, background)
                              for image, (look, _, background) in zip(images, owned)]),
            [owner for _, owner, _ in owned])


def base_samples(base: models.BaseModel, concept_world: ConceptWorld, judge: oracle.Oracle,
                 seed: int) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """The base model's samples (the protocol's sampler, no LoRA) of every neighbour prompt on
    `NEIGHBOUR_BACKGROUNDS`, and of random generic prompts (owner "" : no concept is right)."""
    composer = protocol.Composer(protocol.Setup(base, judge, concept_world), [], protocol.ProtocolConfig())
    pairs = [(world.caption(n, b), c.name) for c in concept_world.concepts for n in neighbours(c.look)
             for b in NEIGHBOUR_BACKGROUNDS]
    rng = np.random.default_rng([seed, 7])
    backgrounds = list(world.BACKGROUNDS)
    generic = [world.caption(world.random_generic_look(rng), backgrounds[i % len(backgrounds)])
               for i in range(GENERIC_PROMPTS)]
    return {"neighbour prompts": (composer.sample([p for p, _ in pairs], list(range(len(pairs)))),
                                  [c for _, c in pairs]),
            "generic prompts": (composer.sample(generic, list(range(len(pairs), len(pairs) + len(generic)))),
                                [""] * len(generic))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--against", type=Path, help="another oracle's weights for the same world, judged beside it")
    parser.add_argument("--samples", type=Path, help="kept samples (a protocol cache's <method>.safetensors)")
    parser.add_argument("--seed", type=int, default=3, help="renders' and prompts' seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=models.CACHE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    concept_world = concepts.make_world(args.world_seed)
    config = oracle.OracleConfig(world_seed=args.world_seed)
    judges = {"current": oracle.load_or_train_oracle(config, args.cache)}
    if args.against:
        judges[args.against.name] = oracle.load_oracle(args.against, config)
    renders, owners = neighbour_renders(concept_world, args.seed)
    augmented = oracle.augment(renders, torch.Generator().manual_seed(args.seed))
    sampled = base_samples(models.load_or_train_base(models.BaseConfig(), args.cache), concept_world,
                           judges["current"], args.seed)
    kept = load_file(str(args.samples)) if args.samples else {}
    print(f"{len(renders)} neighbour renders, {len(sampled['neighbour prompts'][1])} neighbour prompts sampled, "
          f"{GENERIC_PROMPTS} generic prompts sampled; called its concept / called any concept")
    for name, judge in judges.items():
        held_out = oracle.held_out_accuracy(judge, concept_world, 3000, run.ORACLE_CHECK_SEED)
        print(f"{name}: held-out {', '.join(f'{k} {v:.3f}' for k, v in held_out.items())}")
        print(f"  neighbour renders clean {shares(called(oracle.judge(judge, renders), owners))}, augmented "
              f"{shares(called(oracle.judge(judge, augmented), owners))}")
        for label, (images, who) in sampled.items():
            print(f"  base model, {label}: {shares(called(oracle.judge(judge, images), who))}")
        if kept:
            rates = {c: called(oracle.judge(judge, kept[c]), [c] * len(kept[c]))[0]
                     for c in concept_world.names() if c in kept}
            print(f"  {args.samples.name}: mean {np.mean(list(rates.values())):.3f}; "
                  + ", ".join(f"{c} {r:.2f}" for c, r in rates.items()))


if __name__ == "__main__":
    main()
