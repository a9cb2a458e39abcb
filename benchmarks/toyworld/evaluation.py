"""Is the evaluation node's score valid? Its core (cidm.evaluation) fed with the toy oracle's image features
(issue #34).

    python -m benchmarks.toyworld.evaluation --world-seed 0 [--tasks-cidm PATH] [--tasks-finetune PATH]

For cidm and finetune, after every task k, each concept learned so far is sampled as the protocol judges it
(`protocol.judge_stage`: every background, `samples_per_prompt` seeds) and scored two ways:
- IA, as Evaluate Concept Library scores it (`cidm.evaluation.image_alignment`), on the oracle trunk's features
  (the oracle's last layer before its heads, flattened), against held-out renders of the concept: new placements on
  every background, the held-out one included;
- the toy world's own accuracy: the oracle names the concept.
The history goes through the node's own `Evaluation` and `forgetting_table`. Two checks:
1. a concept's IA right after its task exceeds the base model's for the same prompt (the concept replaced by its
   class word: the base model has no token for it);
2. the forgetting the history reports (mean over all but the last concept of peak minus final, the protocol's
   definition) agrees in sign and order between IA and accuracy, and across the two methods.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cidm.evaluation import Evaluation, EvaluationKey, forgetting_table, image_alignment  # noqa: E402

from benchmarks.toyworld import concepts, oracle, protocol, tasks, world  # noqa: E402

METHODS = ("cidm", "finetune")
REFERENCE_SEED = 7919  # added to the world seed: placements the training images never had
REFERENCES_PER_BACKGROUND = 2
RESULTS = REPO / "benchmarks" / "results" / "toyworld" / "v2.6-34-evaluation"


def oracle_features(judge: oracle.Oracle):
    """The image-embedding function: IMAGE-like [N, H, W, 3] in [0, 1] -> the oracle trunk's features [N, D]."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return judge.trunk(images.permute(0, 3, 1, 2) * 2 - 1).flatten(1)
    return embed


def held_out_references(concept: concepts.Concept, world_seed: int) -> torch.Tensor:
    return oracle.as_images(concepts.concept_samples(concept, list(world.BACKGROUNDS), world_seed + REFERENCE_SEED,
                                                     REFERENCES_PER_BACKGROUND))


def base_alignment(setup: protocol.Setup, config: protocol.ProtocolConfig, learned, embed, references) -> dict:
    """Each concept's IA in the base model, for its prompts with the concept replaced by its class word."""
    base = protocol.Composer(setup, [], config)
    scores = {}
    for item in learned:
        prompts = [item.caption(bg).replace(f"<{item.concept.name}> ", "") for bg in config.backgrounds
                   for _ in range(config.samples_per_prompt)]
        seeds = [config.seed * 1000 + i for i in range(len(prompts))]
        scores[item.concept.name] = image_alignment(embed(base.sample(prompts, seeds)), references[item.concept.name])
    return scores


def method_history(setup: protocol.Setup, config: protocol.ProtocolConfig, learned, method: str, embed,
                   references, log) -> tuple[list[Evaluation], list[dict]]:
    """(the node's history of IA after each task, the protocol's judged stages)."""
    mode = protocol.composition_modes(method)[0]
    evaluations, stages = [], []
    for count in range(1, len(learned) + 1):
        composer = protocol.Composer(setup, learned[:count], config, mode=mode)
        stage, images = protocol.judge_stage(composer, learned[:count], config, setup.oracle, setup.world)
        stages.append(stage)
        scores = {name: {"IA": image_alignment(embed(samples), references[name]), "TA": None, "DINO": None}
                  for name, samples in images.items()}
        evaluations.append(Evaluation(EvaluationKey(revision=count, backbone="toy oracle trunk",
                                                    sampler={"mode": mode, "steps": config.sampling_steps},
                                                    seed=config.seed),
                                      tasks=count, scores=scores, skipped={}, created=""))
        log(f"{method}: after task {count}: IA " + " ".join(f"{n} {s['IA']:.3f}" for n, s in scores.items()))
    return evaluations, stages


def summarize(evaluations: list[Evaluation], stages: list[dict], base: dict) -> dict:
    table = forgetting_table(evaluations, evaluations[0].key.series(), "IA")
    names = table.concepts
    forgetting = table.forgetting()
    learned_at = {name: float(table.scores[row, row]) for row, name in enumerate(names)}
    return {"ia": table.scores.tolist(), "tasks": table.tasks, "concepts": names,
            "ia_forgetting": forgetting,
            "ia_forgetting_mean": float(np.mean([forgetting[n] for n in names[:-1]])),
            "ia_final_minus_learned": float(np.mean([table.scores[r, -1] - learned_at[n]
                                                     for r, n in enumerate(names[:-1])])),
            "acc_forgetting_mean": protocol.forgetting(stages, names),
            "acc_final_minus_learned": float(np.mean([stages[-1][n]["acc"] - stages[r][n]["acc"]
                                                      for r, n in enumerate(names[:-1])])),
            "acc": [[stage.get(n, {}).get("acc") for stage in stages] for n in names],
            "ia_learned": learned_at, "ia_base": base,
            "above_base": sum(learned_at[n] > base[n] for n in names), "markdown": table.markdown()}


def markdown(results: dict) -> str:
    lines = [f"# Toy world v2.6: the evaluation node's IA against the oracle (issue #34), world seed "
             f"{results['world_seed']}", "",
             f"Command: `python -m benchmarks.toyworld.evaluation --world-seed {results['world_seed']}`; tasks: "
             + ", ".join(f"{m} `{results['tasks'][m]}`" for m in results["methods"]) + ".", "",
             "| method | IA right after the task > base IA | IA forgetting (peak − final) | accuracy forgetting | "
             "IA final − learned | accuracy final − learned |", "|---|---|---|---|---|---|"]
    for method, r in results["methods"].items():
        lines.append(f"| {method} | {r['above_base']}/{len(r['concepts'])} | {r['ia_forgetting_mean']:.4f} | "
                     f"{r['acc_forgetting_mean']:.3f} | {r['ia_final_minus_learned']:+.4f} | "
                     f"{r['acc_final_minus_learned']:+.3f} |")
    for method, r in results["methods"].items():
        lines += ["", f"## {method}: IA after each task", "", r["markdown"], "",
                  "Base IA (class word, no concept): "
                  + ", ".join(f"{n} {v:.3f}" for n, v in r["ia_base"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks.add_harness_arguments(parser, RESULTS)
    for method in METHODS:
        parser.add_argument(f"--tasks-{method}", type=Path, help=f"{method}'s trained tasks (a file of "
                            "benchmarks.toyworld.tasks), instead of the cache's for the current training code")
    args = parser.parse_args()
    context, configs = tasks.harness_setup(args)
    config = configs[2]
    embed = oracle_features(context.oracle)
    references = {c.name: embed(held_out_references(c, args.world_seed))
                  for c in context.world.concepts[:config.tasks]}
    results = {"world_seed": args.world_seed, "methods": {}, "tasks": {}}
    for method in METHODS:
        learned, results["tasks"][method] = tasks.method_tasks(context, configs, args.cache, method,
                                                               getattr(args, f"tasks_{method}"))
        torch.manual_seed(0)
        evaluations, stages = method_history(context, config, learned, method, embed, references, print)
        results["methods"][method] = summarize(evaluations, stages,
                                               base_alignment(context, config, learned, embed, references))
    out = args.out or (args.cache / "smoke-evaluation" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"world-{args.world_seed}.json").write_text(json.dumps(results, indent=1))
    (out / f"world-{args.world_seed}.md").write_text(markdown(results))
    print(f"results in {out / f'world-{args.world_seed}.md'}")


if __name__ == "__main__":
    main()
