"""Writes the protocol's results: results.json, results.md, and PNGs (accuracy heatmaps, sample grids)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .protocol import UPPER_BOUND, MethodRun, consolidation_name

CELL, MARGIN, ZOOM = 30, 44, 2


def _number(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def heatmap(values: list[list[float | None]], rows: list[str], columns: list[str], title: str) -> Image.Image:
    """A [rows × columns] table of values in [0, 1], white to blue, with the numbers written in."""
    width = max(MARGIN + CELL * len(columns) + 4, 8 + 6 * len(title))  # the default font is 6 px per character
    image = Image.new("RGB", (width, MARGIN + CELL * len(rows) + 4), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), title, fill="black")
    for j, name in enumerate(columns):
        draw.text((MARGIN + j * CELL + 2, 20), name[:4], fill="black")
    for i, name in enumerate(rows):
        draw.text((2, MARGIN + i * CELL + 10), name[:6], fill="black")
        for j, value in enumerate(values[i]):
            box = [MARGIN + j * CELL, MARGIN + i * CELL, MARGIN + (j + 1) * CELL - 1, MARGIN + (i + 1) * CELL - 1]
            if value is None:
                draw.rectangle(box, fill=(235, 235, 235))
                continue
            shade = int(255 * (1 - min(max(value, 0.0), 1.0)))
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 3, box[1] + 10), f"{value:.2f}", fill="black" if value < 0.6 else "white")
    return image


def sample_grid(samples: dict[str, torch.Tensor], columns: int) -> Image.Image:
    """One row per concept (name on the left), its samples in order."""
    _, height, width, _ = samples[next(iter(samples))].shape
    side, across, margin = height * ZOOM, width * ZOOM, MARGIN * 2 if width > height else MARGIN
    image = Image.new("RGB", (margin + columns * across, len(samples) * side), "white")
    draw = ImageDraw.Draw(image)
    for row, (name, images) in enumerate(samples.items()):
        draw.text((2, row * side + side // 2 - 5), name, fill="black")
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for column, tile in enumerate(pixels[:columns]):
            image.paste(Image.fromarray(np.ascontiguousarray(tile)).resize((across, side), Image.Resampling.NEAREST),
                        (margin + column * across, row * side))
    return image


CURVE_COLOURS = ((200, 40, 40), (240, 120, 120), (230, 140, 20), (240, 190, 110), (40, 120, 200),
                 (60, 160, 60), (140, 60, 180))
COMMAND = "HF_HUB_OFFLINE=1 python -m benchmarks.toyworld.run --threads 1"
LEARNABLE_EACH, LEARNABLE_MEAN = 0.85, 0.9


def compositions(methods: dict) -> dict[str, dict]:
    """Every method's scores as composed when trained, then its other compositions ("cidm, one-hot")."""
    rows = {}
    for name, scores in methods.items():
        rows[name] = scores
        rows.update({f"{name}, {mode}": other for mode, other in scores.get("other_compositions", {}).items()})
    return rows


def retention(acc: list[list[float | None]]) -> float | None:
    """Q1: over the concepts learned before the last task, final accuracy / accuracy right after its own task,
    averaged; a concept that was never learned (0 just after its task) has nothing to retain and is left out."""
    ratios = [acc[-1][c] / acc[c][c] for c in range(len(acc) - 1) if acc[c][c]]
    return float(np.mean(ratios)) if ratios else None


def just_trained(acc: list[list[float | None]]) -> float:
    """The mean accuracy of each concept right after its own task (how well a method learns at all)."""
    return float(np.mean([acc[t][t] for t in range(len(acc))]))


def mean_over(values: list[float | None], indices: list[int]) -> float | None:
    picked = [values[i] for i in indices if values[i] is not None]
    return float(np.mean(picked)) if picked else None


def samples_per_cell(results: dict, upper_bound: bool = False) -> int:
    """How many samples each rate (one concept after one task, or one composition pair) is measured on; with
    `upper_bound`, each of the upper bound's single-concept rates (from world v2.4 more than a method's; earlier
    reports have no `upper_bound_samples_per_prompt` and took a method's)."""
    config = results["config"]
    per_prompt = config["samples_per_prompt"]
    if upper_bound:
        per_prompt = config.get("upper_bound_samples_per_prompt", per_prompt)
    return len(config["backgrounds"]) * per_prompt


def mean_rate_error(rates: list[float], samples: int) -> float:
    """The standard error of mean(rates), each rate a binomial proportion over `samples` independent samples."""
    return math.sqrt(sum(v * (1 - v) for v in rates) / samples) / len(rates)


def ratio_with_error(rates: list[float], bounds: list[float], samples: int,
                     bound_samples: int | None = None) -> tuple[float | None, float | None]:
    """mean(rates) / mean(bounds), and its standard error: each rate is a binomial proportion over `samples`
    independent samples (each bound over `bound_samples`, default `samples`), and the two means are taken as
    independent (delta method). The measurement's resolution: with 18 samples per concept a ratio of about 0.9
    carries an error of about 0.06, so a bar of 0.9 is met or missed by noise within that band. Raises nothing;
    (None, None) when the bound's mean is 0."""
    mean_rate, mean_bound = float(np.mean(rates)), float(np.mean(bounds))
    if not mean_bound:
        return None, None
    ratio = mean_rate / mean_bound
    relative = ((mean_rate_error(bounds, bound_samples or samples) / mean_bound) ** 2
                + ((mean_rate_error(rates, samples) / mean_rate) ** 2 if mean_rate else 0.0))
    return ratio, ratio * math.sqrt(relative)


def _ratio(rates: list[float], bounds: list[float], samples: int, bound_samples: int | None = None) -> str:
    ratio, error = ratio_with_error(rates, bounds, samples, bound_samples)
    return _number(ratio) if error is None else f"{_number(ratio)} ± {_number(error)}"


def mean_curve(acc: list[list[float | None]]) -> list[float]:
    """Mean accuracy over the concepts learned so far, after each task."""
    return [float(np.mean([v for v in row if v is not None])) for row in acc]


def curves(results: dict, width: int = 520, height: int = 300) -> Image.Image:
    """Mean accuracy over the learned concepts after each task, one line per method; the upper bound as a level."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 40, 24, width - 150, height - 30
    draw.text((4, 4), "mean acc over learned concepts, after each task", fill="black")
    draw.rectangle([left, top, right, bottom], outline=(200, 200, 200))
    tasks = len(results["concepts"])
    for value in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * value
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((8, y - 5), f"{value:.1f}", fill="black")
    for t in range(tasks):
        draw.text((left + (right - left) * t / max(1, tasks - 1) - 3, bottom + 6), str(t + 1), fill="black")

    def point(t: int, value: float) -> tuple[float, float]:
        return left + (right - left) * t / max(1, tasks - 1), bottom - (bottom - top) * value

    series = [(name, mean_curve(scores["acc"])) for name, scores in compositions(results["methods"]).items()]
    series.append((UPPER_BOUND, [results[UPPER_BOUND]["final_acc"]] * tasks))
    for index, (name, values) in enumerate(series):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        points = [point(t, v) for t, v in enumerate(values)]
        draw.line(points if len(points) > 1 else points * 2, fill=colour, width=2)
        draw.text((right + 10, top + 14 * index), name, fill=colour)
    return image


def questions(results: dict) -> list[str]:
    """The issues' questions (#5, #13), each with its goal and the number measured."""
    methods, names, upper = results["methods"], results["concepts"], results[UPPER_BOUND]
    paired = [names.index(n) for pair in results["same_shape_pairs"] for n in pair]
    lines = ["## Questions", "", "| | goal | measured |", "|---|---|---|"]
    cidm = methods.get("cidm")
    if cidm:
        lines.append(f"| Q1 CIDM ({cidm['composition']}) retention (final / just-trained acc, old concepts) | ≥ 0.95 | "
                     f"{_number(retention(cidm['acc']))} |")
        bound_samples = samples_per_cell(results, upper_bound=True)
        lines.append(f"| CIDM ({cidm['composition']}) final acc / upper bound (± 1 standard error) | ≥ 0.9 | "
                     f"{_number(cidm['final_acc'])} / {_number(upper['final_acc'])} = "
                     f"{_ratio(cidm['acc'][-1], upper['acc'], samples_per_cell(results), bound_samples)} |")
    ordering = sorted(methods, key=lambda m: -methods[m]["final_acc"])
    lines.append("| Q2 final acc ordering (context acc) | cidm > c-lora > finetune | " + " > ".join(
        f"{m} {_number(methods[m]['final_acc'])} ({_number(methods[m]['final_context'])})" for m in ordering) + " |")
    for name, scores in compositions({"cidm": cidm} if cidm else {}).items():
        goal = ("1 / 0 (named: read from the prompt's tokens, so this checks the bookkeeping)"
                if scores["composition"] == "named" else "≥ 0.9 / ≥ 0.8 (right, pairs)")
        lines.append(f"| Q4 {name}: routing weight on the right concept, all / same-shape pairs; on the partner | "
                     f"{goal} | {_number(scores['final_weight_right'])} / "
                     f"{_number(mean_over(scores['weight_right'][-1], paired))}; "
                     f"{_number(scores['final_weight_partner'])} |")
    base = results["base"]["generic"]["all"]
    lines += [f"| Q5 {m}: ordinary prompts, all concepts composed, all-4 / base | ≥ 0.98 (#13) | "
              f"{_number(s['generic']['all'])} / {_number(base)} = "
              f"{_number(s['generic']['all'] / base if base else None)} |" for m, s in compositions(methods).items()]
    lines += ["", "Per method: " + "; ".join(
        f"{m}: just-trained acc {_number(just_trained(s['acc']))}, retention {_number(retention(s['acc']))}"
        for m, s in compositions(methods).items()) + ".", ""]
    return lines


def regions_table(methods: dict, upper: dict, samples: int) -> list[str]:
    """Two-concept compositions after the last task, per region layout: both concepts named, each in its own tile;
    the composition upper bound (each region under its own concept's LoRA only) as the last rows, and every
    method's "both" against it."""
    lines = ["", "## Two-concept compositions", "",
             "Two regions, each with its own concept prompt, the global prompt naming both (\"a <a> star on the left "
             "and a <b> circle on the right on a white background\"), by region-aware cross-attention (the "
             "Context-Controlled KSampler's default, one UNet call per step). Layouts (regions as canvas fractions): "
             "left/right halves; overlapping, [0, 0.625] and [0.375, 1] across, full height; unequal, the left "
             "half and a box of 56 % of the right tile (x 0.5625–0.9375, y 0.125–0.875), the rest of that tile "
             "under the global prompt; global names none, the halves under a global prompt with the class words "
             "only (\"a star on the left and a circle on the right ...\": each concept comes from its region "
             "alone, issue #29); judged by the left and right 32×32 tiles. both: the oracle names the right concept in each "
             "tile; bleed: a tile shows the other concept. Composition upper bound: the two concepts' own LoRAs "
             "(trained alone), each region under its own concept's LoRA only (named routing). Goal (#14): both ≥ "
             "0.9 × the composition upper bound, bleed ≤ 0.05.", "",
             "| method | layout | both, all pairs | / upper bound (± 1 standard error) | same-shape pairs | different shapes | bleed | "
             "left tile | right tile |", "|---|---|---|---|---|---|---|---|---|"]
    rows = dict(methods)
    if "regions" in upper:
        rows[f"composition {UPPER_BOUND}"] = upper

    def mean(pairs, key: str, same: bool | None = None) -> float | None:
        values = [p[key] for p in pairs if same is None or p["same_shape"] == same]
        return float(np.mean(values)) if values else None

    for name, scores in rows.items():
        for layout, pairs in scores["regions"].items():
            pairs = list(pairs.values())
            both = mean(pairs, "both")
            bounds = [p["both"] for p in upper["regions"][layout].values()] if "regions" in upper else []
            ratio = ("1" if scores is upper else _ratio([p["both"] for p in pairs], bounds, samples)) if bounds else "–"
            lines.append(f"| {name} | {layout} | {_number(both)} | {ratio} | "
                         f"{_number(mean(pairs, 'both', True))} | {_number(mean(pairs, 'both', False))} | "
                         f"{_number(mean(pairs, 'bleed'))} | {_number(mean(pairs, 'left'))} | "
                         f"{_number(mean(pairs, 'right'))} |")
    return lines


PREVIOUS = Path(__file__).resolve().parents[1] / "results" / "toyworld" / "results.json"  # world v1, seed 0


def previous_line(results: dict, previous: Path = PREVIOUS) -> list[str]:
    """One line comparing these results with the previous committed run (world v1): final mean accuracy of the
    upper bound and of each method both runs have, and "both in place" of their left/right compositions."""
    if not previous.is_file():
        return []
    before = json.loads(previous.read_text(encoding="utf-8"))

    def both(scores: dict) -> float | None:
        pairs = scores.get("regions", {})
        pairs = pairs.get("left/right", pairs)  # v1 kept one layout, unnamed
        values = [p["both"] for p in pairs.values()]
        return float(np.mean(values)) if values else None

    cells = [f"upper bound {_number(before[UPPER_BOUND]['final_acc'])} → {_number(results[UPPER_BOUND]['final_acc'])}"]
    for name in results["methods"]:
        if name in before["methods"]:
            old, new = before["methods"][name], results["methods"][name]
            cells.append(f"{name} {_number(old['final_acc'])} ({old['composition']}) → {_number(new['final_acc'])} "
                         f"({new['composition']}), both in place {_number(both(old))} → {_number(both(new))}")
    return ["", f"Compared with the previous run (world v1, seed 0, `{previous.relative_to(previous.parents[3])}`): "
            "final mean accuracy " + "; ".join(cells) + "."]


def variant_flags(config: dict) -> str:
    """The command-line flags of a run's ablation (run.Variant): its token-slot rule and consolidation terms; none
    for the defaults, one slot per layer and both terms."""
    rule = config.get("token_slots", "layer")
    terms = consolidation_name(config["training"]["consolidation"])
    return (("" if rule == "layer" else f" --token-slots {rule}")
            + ("" if terms == "both" else f" --consolidation {terms}"))


def markdown(results: dict) -> str:
    methods, upper = results["methods"], results[UPPER_BOUND]
    base = results["base"]
    config = results["config"]
    lines = ["# Toy-world continual concept benchmark", "",
             f"Command: `{COMMAND} --world-seed {results['world_seed']}{variant_flags(config)}` "
             f"(seeds: world {results['world_seed']}, base "
             f"model {results['base_model']['seed']}, protocol {config['seed']}); {results['seconds'] / 60:.0f} min "
             "for this report, the runs kept in the cache not counted. Composition at sampling time: "
             + ", ".join(f"{m} {s['composition']}" for m, s in methods.items()) + ".", "",
             *questions(results),
             f"Concepts, in task order: {', '.join(results['concepts'])}. Same-shape pairs: "
             + (", ".join(f"{a}/{b}" for a, b in results["same_shape_pairs"]) or "none") + ".",
             "Oracle on held-out renders: " + ", ".join(f"{k} {_number(v)}" for k, v in results["oracle"].items())
             + ".", "",
             "acc: the oracle names the prompt's concept (argmax); strict: with p ≥ 0.9; context: the background is "
             "right; forgetting: best accuracy before the last task minus final accuracy; weight right/partner: "
             "mean routing weight on the concept's own task / on its same-shape partner; control FP: prompts for the "
             "closest generic object judged as the concept; Q5 all-4: ordinary prompts with all concepts "
             "aggregated, all four attributes right.", "",
             "| method | acc | strict | context | forgetting | weight right | weight partner | partner rate | control FP "
             "(strict) | Q5 all-4 | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, scores in compositions(methods).items():
        control = scores.get("control")
        control_cell = (f"{_number(control['false_positive'])} ({_number(control['false_positive_strict'])})"
                        if control else "–")
        minutes = f"{scores['seconds'] / 60:.1f}" if "seconds" in scores else "–"
        lines.append(f"| {name} | {_number(scores['final_acc'])} | {_number(scores['final_strict'])} | "
                     f"{_number(scores['final_context'])} | {_number(scores['forgetting'])} | "
                     f"{_number(scores['final_weight_right'])} | {_number(scores['final_weight_partner'])} | "
                     f"{_number(scores['final_partner_rate'])} | {control_cell} | "
                     f"{_number(scores['generic']['all'])} | {minutes} |")
    lines.append(f"| {UPPER_BOUND} (own LoRA alone) | {_number(upper['final_acc'])} | {_number(upper['final_strict'])} "
                 f"| {_number(upper['final_context'])} | – | 1 | – | – | – | – | {upper['seconds'] / 60:.1f} |")
    lines.append(f"| base model | – | – | – | – | – | – | – | {_number(base['control']['false_positive'])} "
                 f"({_number(base['control']['false_positive_strict'])}) | {_number(base['generic']['all'])} | – |")
    counted = samples_per_cell(results, upper_bound=True)
    lines += ["", f"{UPPER_BOUND}, per concept (acc / strict, {counted} samples each): " + ", ".join(
        f"{n} {_number(a)} / {_number(b)}" for n, a, b in zip(results["concepts"], upper["acc"], upper["strict"]))
        + f". Learnability (goal: every concept ≥ {LEARNABLE_EACH}, mean ≥ {LEARNABLE_MEAN}): lowest "
        f"{_number(min(upper['acc']))} ± {_number(mean_rate_error([min(upper['acc'])], counted))}, mean "
        f"{_number(upper['final_acc'])} ± {_number(mean_rate_error(upper['acc'], counted))}, "
        + ("met." if learnable(upper["acc"]) else "missed.")]
    lines += previous_line(results)
    lines += regions_table(methods, upper, samples_per_cell(results))
    for name, scores in compositions(methods).items():
        lines += ["", f"## {name}: acc[task][concept]", "",
                  "| after task | " + " | ".join(results["concepts"]) + " |",
                  "|---" * (len(results["concepts"]) + 1) + "|"]
        lines += [f"| {t + 1} | " + " | ".join(_number(v) for v in row) + " |" for t, row in enumerate(scores["acc"])]
    return "\n".join(lines) + "\n"


def learnable(acc: list[float]) -> bool:
    """Issue #12's bar for the instrument: every concept's own LoRA alone is recognised, per concept and on average."""
    return min(acc) >= LEARNABLE_EACH and float(np.mean(acc)) >= LEARNABLE_MEAN


def file_slug(name: str) -> str:
    """A method or composition name in file names: "upper bound" -> "upper-bound", "cidm, one-hot" -> "cidm-one-hot"."""
    return name.replace(", ", "-").replace(" ", "-")


def first_seeds(samples: dict[str, torch.Tensor], results: dict) -> dict[str, torch.Tensor]:
    """Each concept's samples cut to the first `samples_per_prompt` seeds of each background, as a method's grid shows
    them (the upper bound takes more seeds per background: see `upper_bound_samples`)."""
    config = results["config"]
    backgrounds, seeds = len(config["backgrounds"]), config["samples_per_prompt"]
    return {name: images.reshape(backgrounds, -1, *images.shape[1:])[:, :seeds].flatten(0, 1)
            for name, images in samples.items()}


def write(results: dict, runs: dict[str, MethodRun], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    names = results["concepts"]
    per_grid = len(results["config"]["backgrounds"]) * results["config"]["samples_per_prompt"]
    for method, run in runs.items():
        if method != UPPER_BOUND:
            rows = [f"task {t + 1}" for t in range(len(run.scores["acc"]))]
            for name, scores in compositions({method: run.scores}).items():
                heatmap(scores["acc"], rows, names, f"{name}: acc[task][concept]").save(
                    out / f"acc-{file_slug(name)}.png")
        sample_grid(first_seeds(run.samples, results), per_grid).save(out / f"samples-{file_slug(method)}.png",
                                                                       optimize=True)
        if run.region_samples:  # the first seed per background: the wide tiles make a full grid megabytes
            seeds = results["config"]["samples_per_prompt"]
            sample_grid({pair: images[::seeds] for pair, images in run.region_samples.items()},
                        per_grid // seeds).save(out / f"regions-{file_slug(method)}.png", optimize=True)
    curves(results).save(out / "curves.png")
