"""C-LoRA's λ measured: the first tasks of a world learned with c-lora at several normalised λ, against the upper bound.

    python -m benchmarks.toyworld.sweep --threads 1 --world-seed 0 --tasks 3 --lambdas 0 0.1 1 10 100

For each λ, after each task t: the just-trained accuracy of task t's concept, the accuracy of the older concepts
(all tasks summed at weight 1, as c-lora samples), ‖ΔW_t‖ (task t's key/value updates, Frobenius norm summed over
layers) against ‖ΔW_1‖, the final penalty, and how dense the protected region is: the share of entries of
M = Σ_{j<t} ΔW_j with |M| ≥ 10⁻³·max|M| (1.0 means "wherever the earlier updates changed the weights" is
everywhere, the degenerate case where the penalty can only pull ΔW_t toward 0). The upper bound is each concept's
own LoRA trained alone, as in the protocol. Acceptance (issue #12): every task's just-trained accuracy ≥ 0.8 × its
upper bound while the old concepts are still regularised (λ > 0).

Writes `<out>/clora-sweep.json` and `clora-sweep.md`; uses the cached base model and the world's oracle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from cidm.consolidation import CLoRAConsolidator
from cidm.train import TrainedTask

from . import models, protocol, run

ACCEPT_RATIO = 0.8
DENSE_THRESHOLD = 1e-3


def update_norm(task: TrainedTask, projections: tuple[str, ...]) -> float:
    return float(sum((up @ down).norm() for (_, proj), (down, up) in task.lora.items() if proj in projections))


def density(consolidator: CLoRAConsolidator) -> float | None:
    """Share of the protected entries: |M| ≥ 10⁻³·max|M|, over every regularised projection."""
    if not consolidator.merged:
        return None
    dense = [(m.abs() >= DENSE_THRESHOLD * m.abs().max()).float().mean().item() for m in consolidator.merged.values()]
    return float(sum(dense) / len(dense))


def sweep_lambda(setup: protocol.Setup, config: protocol.ProtocolConfig, clora: float, tasks: int,
                 log) -> list[dict]:
    training = dataclasses.replace(config.training, consolidation=dataclasses.replace(
        config.training.consolidation, clora=clora))
    config = dataclasses.replace(config, training=training)
    learned, rows = [], []
    for index in range(tasks):
        trainer, item = protocol.learn(setup, index, learned, "c-lora", config)
        learned.append(item)
        composer = protocol.Composer(setup, learned, config, mode="fixed")
        stage, _ = protocol.judge_stage(composer, learned, config, setup.oracle, setup.world)
        projections = trainer.consolidator.trained_projections
        rows.append({"task": index + 1, "concept": item.concept.name, "just_trained": stage[item.concept.name]["acc"],
                     "old": {c.concept.name: stage[c.concept.name]["acc"] for c in learned[:-1]},
                     "update_norm": update_norm(item.task, projections),
                     "penalty": item.task.consolidation_penalty, "protected_share": density(trainer.consolidator)})
        log(f"c-lora λ={clora:g}: task {index + 1} {item.concept.name} acc {rows[-1]['just_trained']:.2f}, "
            f"‖ΔW‖ {rows[-1]['update_norm']:.3g}, old {rows[-1]['old']}")
    return rows


def upper_bounds(setup: protocol.Setup, config: protocol.ProtocolConfig, tasks: int) -> dict[str, float]:
    bounds = {}
    for index in range(tasks):
        _, item = protocol.learn(setup, index, [], "finetune", config)
        scores, _ = protocol.judge_concept(protocol.Composer(setup, [item], config, mode="fixed"), item, None, config,
                                           setup.oracle)
        bounds[item.concept.name] = scores["acc"]
    return bounds


def markdown(result: dict) -> str:
    lines = [f"# C-LoRA λ sweep (world seed {result['world_seed']}, {result['tasks']} tasks)", "",
             "Upper bound (own LoRA alone): " + ", ".join(f"{n} {a:.2f}" for n, a in result["upper_bound"].items())
             + f". Accepted: every task's just-trained acc ≥ {ACCEPT_RATIO} × its upper bound.", "",
             "| λ | task | just-trained acc (/ upper bound) | old concepts' acc | ‖ΔW_t‖ (/ ‖ΔW_1‖) | penalty | "
             "protected share of M |", "|---|---|---|---|---|---|---|"]
    for clora, rows in result["runs"].items():
        first = rows[0]["update_norm"] or float("nan")
        for row in rows:
            bound = result["upper_bound"][row["concept"]]
            old = ", ".join(f"{n} {a:.2f}" for n, a in row["old"].items()) or "–"
            share = "–" if row["protected_share"] is None else f"{row['protected_share']:.2f}"
            lines.append(f"| {clora} | {row['task']} {row['concept']} | {row['just_trained']:.2f} "
                         f"({row['just_trained'] / bound if bound else float('nan'):.2f}) | {old} | "
                         f"{row['update_norm']:.3g} ({row['update_norm'] / first:.2f}) | {row['penalty']:.3g} | "
                         f"{share} |")
        accepted = all(r["just_trained"] >= ACCEPT_RATIO * result["upper_bound"][r["concept"]] for r in rows)
        lines.append(f"| {clora} | accepted | {'yes' if accepted else 'no'} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=models.CACHE)
    parser.add_argument("--out", type=Path, help=f"default {run.RESULTS} (with --smoke: the cache)")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration: checks the script end to end")
    args = parser.parse_args()
    setup, (_, _, config), _ = run.setup(args.smoke, args.cache, args.threads, print, args.world_seed)
    tasks = min(args.tasks, config.tasks)
    result = {"world_seed": args.world_seed, "tasks": tasks, "upper_bound": upper_bounds(setup, config, tasks),
              "runs": {f"{clora:g}": sweep_lambda(setup, config, clora, tasks, print) for clora in args.lambdas}}
    out = (args.out or (args.cache / "smoke-results" if args.smoke else run.RESULTS)) / f"world-{args.world_seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "clora-sweep.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "clora-sweep.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
