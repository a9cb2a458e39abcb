"""Automatic regions in the toy world (issue #31): cidm's concepts composed with no boxes, each concept's region
found from its tokens' cross-attention in a probe at the start of the same sampling run (cidm.auto_regions),
against the same prompts with boxes.

    python -m benchmarks.toyworld.auto_regions --world-seed 0 --train   # train cidm's 10 tasks once (cached)
    python -m benchmarks.toyworld.auto_regions --world-seed 0           # the sweep and the report

The tasks are the protocol's cidm tasks (`benchmarks.toyworld.tasks`: trained once and kept in the cache), so that
the probe's settings can be swept without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cidm.aggregation import RowRouter  # noqa: E402
from cidm.auto_regions import AttentionProbe, AutoMasks, ProbeSettings, auto_masks, probe_grid  # noqa: E402
from cidm.backends.diffusers_backend import RegionBatch  # noqa: E402
from cidm.routing import LayerwisePrompt, only_concept  # noqa: E402

from benchmarks.toyworld import models, protocol, tasks  # noqa: E402

class AutoComposer(protocol.Composer):
    """The protocol's Composer with automatic regions (cidm.auto_regions): the first `settings.probe_steps` DDIM
    steps sample the global prompt under `named` routing while an AttentionProbe reads the concepts' maps; each
    sample then goes on from there with its own regions, each region attending to the global prompt through its
    concept's LoRA only (`cidm.routing.only_concept`), or with no regions when the probe could not place the
    concepts."""

    def prompt(self, text: str) -> LayerwisePrompt:
        """The LayerwisePrompt of a prompt, with its concepts' positions (as CIDM Text Encode makes it)."""
        expanded = self.vocabulary.expand(text)
        embeddings = self.vocabulary.embeddings
        concepts = self.vocabulary.named_concepts(expanded, self.encoder.token_positions(expanded, embeddings))
        layers = self.encoded(text)[0].reshape(len(self.denoiser.layers), -1, self.uncond.shape[-1])
        return LayerwisePrompt(layers, tuple(self.vocabulary.tokens_in(expanded)), "toyworld",
                               concepts)

    @torch.no_grad()
    def sample_auto(self, prompts: list[str], seeds: list[int], settings: ProbeSettings,
                    size: tuple[int, int]) -> tuple[torch.Tensor, list[AutoMasks]]:
        """([N, H, W, 3] images, each sample's AutoMasks) for global prompts that name the same concepts at the same
        token positions, on a canvas of `size` latent cells."""
        described = [self.prompt(text) for text in prompts]
        concepts = described[0].concepts
        if any(d.concepts != concepts for d in described):
            raise ValueError("sample_auto: the prompts name different concepts or name them at other positions")
        probed = settings.probe_steps(self.config.sampling_steps)
        latents, maps = self.probe(prompts, seeds, [list(c.positions) for c in concepts],
                                   probe_grid(size, settings.downscale), probed, size)
        contexts, weights = self._rows(prompts)
        scheduler = self.scheduler()
        found = [auto_masks(maps[i], [c.name for c in concepts], settings) for i in range(len(prompts))]
        outputs = []
        for index, item in enumerate(found):
            rows = [index, len(prompts) + index]
            regions = None
            if item.masks is not None:
                regional = [self.router.route(only_concept(described[index], c), None, len(self.denoiser.layers))
                            for c in concepts]
                regions = RegionBatch(list(item.masks), [contexts[rows]] * len(concepts),
                                      [torch.stack([w, w]) for w in regional], [False, True], size)
            with self.denoiser.adapted(self.banks, RowRouter(weights[rows]), regions):
                outputs.append(self._steps(scheduler, scheduler.timesteps[probed:], latents[index:index + 1],
                                           contexts[rows]))
        return protocol.models.to_images(torch.cat(outputs)), found

    @torch.no_grad()
    def probe(self, prompts: list[str], seeds: list[int], positions: list[list[int]], grid: tuple[int, int],
              count: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the latents [N, C, H, W] after the first `count` steps of `prompts` from the seeds' noise on a canvas of
        `size` latent cells, the AttentionProbe's maps [N, K, h, w] of the token `positions` on `grid`)."""
        channels = protocol.models.LATENT_SHAPE[0]
        latents = torch.stack([torch.randn((channels, *size), generator=torch.Generator().manual_seed(seed))
                               for seed in seeds])
        contexts, weights = self._rows(prompts)
        scheduler = self.scheduler()
        probe = AttentionProbe(positions, grid)
        with self.denoiser.adapted(self.banks, RowRouter(weights), probe=probe, probe_rows=len(prompts)):
            latents = self._steps(scheduler, scheduler.timesteps[:count], latents, contexts)
        return latents, probe.maps()



def unplaced_prompt(first: protocol.LearnedConcept, second: protocol.LearnedConcept, background: str) -> str:
    """A composition prompt without position words: "a <zarp> star and a <quil> star on a white background"."""
    return f"{first.concept.phrase(True)} and {second.concept.phrase(True)} on a {background} background"


def judge_pairs(pairs, sample, config, oracle, placed_words: bool = True) -> dict:
    """Per pair, two-concept canvases from `sample(prompts, seeds)` -> (images [N, 32, 64, 3], AutoMasks per sample
    or None), judged tile by tile: with position words (`placed_words`), `both` (the first concept in the left tile
    and the second in the right), `left`, `right` and `bleed` as protocol.judge_regions scores them; without, `both`
    counts either order. With automatic regions, also `fallback` (the share of samples the probe could not place)
    and `placed` (the share of placed samples whose first concept's region lies mostly in the left tile and the
    second's in the right)."""
    scores = {}
    for a, b in pairs:
        prompts = [protocol.composition_prompts(a, b, bg)[0] if placed_words else unplaced_prompt(a, b, bg)
                   for bg in config.backgrounds for _ in range(config.samples_per_prompt)]
        images, found = sample(prompts, [config.seed * 1000 + i for i in range(len(prompts))])
        pair = protocol.tile_scores(images, a, b, oracle, either_order=not placed_words)
        if found is not None:
            pair["fallback"] = protocol._rate([item.masks is None for item in found])
            pair["placed"] = protocol._rate([in_place(item.masks) for item in found if item.masks is not None])
        scores[f"{a.concept.name}+{b.concept.name}"] = pair
    return scores


def in_place(masks: torch.Tensor) -> bool:
    """Whether mask 0 lies mostly (over half its area) in the canvas's left half and mask 1 in the right half."""
    half = masks.shape[-1] // 2
    return bool(masks[0, :, :half].sum() > masks[0].sum() / 2) and bool(masks[1, :, half:].sum() > masks[1].sum() / 2)


SWEEP = tuple(ProbeSettings(steps=share, downscale=downscale, threshold=threshold)
              for share in (0.1, 0.2, 0.3) for downscale in (2, 4) for threshold in (0.3, 0.5))
RESULTS = REPO / "benchmarks" / "results" / "toyworld" / "v2.6-31-auto-regions"


def mean_of(pairs: dict, key: str) -> float:
    values = [scores[key] for scores in pairs.values() if scores[key] == scores[key]]
    return sum(values) / len(values) if values else float("nan")


def evaluate(setup: protocol.Setup, config: protocol.ProtocolConfig, learned, sweep, log) -> dict:
    """On the same pairs, prompts and seeds: boxes (the left/right halves); no regions (`named` routing over the
    whole canvas, what the fallback samples); automatic regions for every setting of `sweep`; and, with the
    default settings (ProbeSettings()) and with no regions, the prompts without position words."""
    pairs = protocol.region_pairs(learned, setup.world)
    composer = AutoComposer(setup, learned, config, mode="named")
    channels, height, width = models.LATENT_SHAPE
    size = (height, 2 * width)

    def plain(prompts, seeds):
        return composer._sample(prompts, [], seeds, (channels, *size)), None

    def automatic(settings):
        return lambda prompts, seeds: composer.sample_auto(prompts, seeds, settings, size)

    boxes, _ = protocol.judge_regions(pairs, lambda a, b, prompts, seeds, layout: composer.sample_regions(
        prompts, seeds, layout), dataclasses.replace(config, layouts=("left/right",)), setup.oracle)
    results = {"boxes": boxes["left/right"], "no regions": judge_pairs(pairs, plain, config, setup.oracle),
               "auto": [], "no position words": {
                   "no regions": judge_pairs(pairs, plain, config, setup.oracle, placed_words=False),
                   "auto": judge_pairs(pairs, automatic(ProbeSettings()), config, setup.oracle,
                                       placed_words=False),
                   "settings": dataclasses.asdict(ProbeSettings())}}
    for name in ("boxes", "no regions"):
        log(f"{name}: both {mean_of(results[name], 'both'):.3f} bleed {mean_of(results[name], 'bleed'):.3f}")
    for name, scores in results["no position words"].items():
        if name != "settings":
            log(f"no position words, {name}: both (either order) {mean_of(scores, 'both'):.3f}")
    for settings in sweep:
        scores = judge_pairs(pairs, automatic(settings), config, setup.oracle)
        results["auto"].append({"settings": dataclasses.asdict(settings), "pairs": scores})
        log(f"{settings}: both {mean_of(scores, 'both'):.3f} bleed {mean_of(scores, 'bleed'):.3f} fallback "
            f"{mean_of(scores, 'fallback'):.3f} placed {mean_of(scores, 'placed'):.3f}")
    return results


@torch.no_grad()
def localization(composer: AutoComposer, pairs, config, steps: tuple[int, ...] = (2, 6), downscale: int = 4) -> dict:
    """Which tokens' cross-attention shows where each object is: per pair and kind of token (the concept's own
    tokens, the class noun after them, the position word of its phrase), the share of samples whose first
    concept's map, after `steps` probe steps, leans further to the left tile than the second's (0.5: chance)."""
    _, height, width = models.LATENT_SHAPE
    size = (height, 2 * width)
    found = {}
    for a, b in pairs:
        prompts = [protocol.composition_prompts(a, b, bg)[0] for bg in config.backgrounds
                   for _ in range(config.samples_per_prompt)]
        concepts = composer.prompt(prompts[0]).concepts
        ids, _ = composer.encoder.placeholder_ids(composer.vocabulary.expand(prompts[0]),
                                                  composer.vocabulary.embeddings)
        words = composer.encoder.tokenizer.convert_ids_to_tokens(ids.tolist())
        kinds = {"concept tokens": [list(c.positions) for c in concepts],
                 "class noun": [[c.positions[-1] + 1] for c in concepts],
                 "position word": [[words.index("left")], [words.index("right")]]}
        for kind, positions in kinds.items():
            for count in steps:
                _, maps = composer.probe(prompts, list(range(len(prompts))), positions, probe_grid(size, downscale),
                                         count, size)
                lean = maps[..., : maps.shape[-1] // 2].mean(dim=(-1, -2)) - maps[..., maps.shape[-1] // 2:].mean(
                    dim=(-1, -2))
                found.setdefault(f"{kind}, {count} steps", {})[f"{a.concept.name}+{b.concept.name}"] = float(
                    (lean[:, 0] > lean[:, 1]).float().mean())
    return found


def markdown(results: dict, world_seed: int) -> str:
    """The results as a table: each way of composing, over the world's region pairs (means of the per-pair rates)."""
    lines = [f"World seed {world_seed}: {len(results['boxes'])} pairs, tasks `{Path(results['tasks']).name}`.", "",
             "| composition | both in place | bleed | fallback | regions in place |", "|---|---|---|---|---|"]

    def row(label: str, pairs: dict) -> str:
        cells = [mean_of(pairs, key) if any(key in p for p in pairs.values()) else None
                 for key in ("both", "bleed", "fallback", "placed")]
        return f"| {label} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |"

    lines.append(row("boxes (left/right halves)", results["boxes"]))
    lines.append(row("no regions (`named`)", results["no regions"]))
    for entry in results["auto"]:
        settings = entry["settings"]
        lines.append(row(f"automatic: probe {settings['steps']:.0%} of steps, grid 1/{settings['downscale']}, "
                         f"threshold {settings['threshold']}", entry["pairs"]))
    unplaced = results["no position words"]
    lines += ["", "Without position words (both concepts present, one per tile, either order):", "",
              "| composition | both present |", "|---|---|",
              f"| no regions (`named`) | {mean_of(unplaced['no regions'], 'both'):.3f} |",
              f"| automatic (default settings) | {mean_of(unplaced['auto'], 'both'):.3f} |"]
    if "localization" in results:
        lines += ["", "Which tokens show where the objects are (share of samples whose first concept's map leans "
                  "further left than the second's; 0.5 is chance):", "", "| tokens probed | mean over pairs | "
                  "lowest pair | highest pair |", "|---|---|---|---|"]
        for kind, pairs in results["localization"].items():
            values = list(pairs.values())
            lines.append(f"| {kind} | {sum(values) / len(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks.add_harness_arguments(parser, RESULTS)
    parser.add_argument("--train", action="store_true", help="train (or find) the tasks, and stop")
    parser.add_argument("--tasks", type=Path, help="the trained tasks to use (a file written by --train), "
                        "instead of the cache's for the current training code")
    parser.add_argument("--default-only", action="store_true", help="automatic regions with the default settings "
                        "only (ProbeSettings()), not the whole sweep")
    args = parser.parse_args()
    context, configs = tasks.harness_setup(args)
    learned, kept = tasks.method_tasks(context, configs, args.cache, "cidm", args.tasks)
    if args.train:
        return
    torch.manual_seed(0)
    sweep = (ProbeSettings(),) if args.default_only else SWEEP[:2] if args.smoke else SWEEP
    results = evaluate(context, configs[2], learned, sweep, print)
    results["localization"] = localization(AutoComposer(context, learned, configs[2]),
                                           protocol.region_pairs(learned, context.world), configs[2])
    results["tasks"] = kept
    out = args.out or (args.cache / "smoke-auto-regions" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"world-{args.world_seed}.json").write_text(json.dumps(results, indent=1))
    (out / f"world-{args.world_seed}.md").write_text(markdown(results, args.world_seed))
    print(f"results in {out / f'world-{args.world_seed}.json'}")


if __name__ == "__main__":
    main()
