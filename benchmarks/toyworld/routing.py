"""Routing apart from consolidation (issue #33, item 1): one method's trained tasks judged under each composition
rule, `fixed` (every task summed at weight 1, as c-lora and finetune are reported) and `named` (the tasks the prompt
names, the product's default, as cidm is reported), with no retraining.

    python -m benchmarks.toyworld.routing --world-seed 0 --method finetune [--tasks PATH]

The tasks come from `benchmarks.toyworld.tasks` (trained once, kept in the cache); each rule is judged as the
protocol judges a method (`protocol.judge_tasks` after every task, then the compositions of `judge_regions`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.toyworld import protocol, report, tasks  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "toyworld" / "v2.6-33-routing"
MODES = ("fixed", "named")


def judge_rule(setup: protocol.Setup, config: protocol.ProtocolConfig, learned, mode: str, label: str, log) -> dict:
    scores, _, composer = protocol.judge_tasks(setup, learned, config, mode, log, label)
    scores["retention"] = report.retention(scores["acc"])
    scores["regions"], _ = protocol.judge_regions(
        protocol.region_pairs(learned, setup.world),
        lambda a, b, prompts, seeds, boxes: composer.sample_regions(prompts, seeds, boxes), config, setup.oracle)
    return scores


def markdown(results: dict) -> str:
    method, seed = results["method"], results["world_seed"]
    lines = [f"# Toy world v2.6: {method}'s tasks under each routing rule (issue #33), world seed {seed}", "",
             f"Command: `python -m benchmarks.toyworld.routing --world-seed {seed} --method {method}`; tasks "
             f"`{results['tasks']}`.", "",
             "| rule | final acc | strict | retention | forgetting | generic, all four | "
             + " | ".join(f"{layout}: both in place" for layout in protocol.LAYOUTS) + " | bleed |",
             "|---" * (7 + len(protocol.LAYOUTS)) + "|"]
    for mode, s in results["rules"].items():
        regions = s["regions"]
        both = [np.mean([pair["both"] for pair in regions[layout].values()]) for layout in protocol.LAYOUTS]
        bleed = np.mean([pair["bleed"] for layout in protocol.LAYOUTS for pair in regions[layout].values()])
        cells = [s["final_acc"], s["final_strict"], s["retention"], s["forgetting"], s["generic"]["all"], *both, bleed]
        lines.append(f"| {mode} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks.add_harness_arguments(parser, RESULTS)
    parser.add_argument("--method", choices=protocol.RUN_METHODS, required=True)
    parser.add_argument("--tasks", type=Path, help="the method's trained tasks (a file of benchmarks.toyworld.tasks), "
                        "instead of the cache's for the current training code")
    args = parser.parse_args()
    context, configs = tasks.harness_setup(args)
    config = configs[2]
    learned, kept = tasks.method_tasks(context, configs, args.cache, args.method, args.tasks)
    results = {"method": args.method, "world_seed": args.world_seed, "tasks": kept,
               "rules": {mode: judge_rule(context, config, learned, mode, args.method, print) for mode in MODES}}
    out = args.out or (args.cache / "smoke-routing" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"world-{args.world_seed}-{args.method}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results))
    print(f"results in {out / f'{stem}.md'}")


if __name__ == "__main__":
    main()
