"""Sampling-step time of stock KSampler with and without CIDM in one run of the real server: the stock graph
(CheckpointLoaderSimple → CLIPTextEncode → KSampler) against the same KSampler on a model patched by Elastic
Aggregate LoRAs (synthetic libraries of 1, 10, 25 and 50 tasks) with CIDM Text Encode conditioning; the prompt
names one concept and the negative is a stock CLIPTextEncode prompt. Goals (routing mode `named`, the default):
ratio to stock at the largest library ≤ 1.05; cost per added task (least-squares slope) ≤ 0.1 % of the stock step.

    ~/.cache/cidm-comfyui/venv/bin/python benchmarks/bench_sampling.py [--layout full] [--resolution 512]
"""

from __future__ import annotations

import argparse

from common import (BenchServer, Timing, basis, common_arguments, print_table, seconds_per_step, unique, verdict,
                    write_json)
from synthetic import synthesize_library

CFG = 5.0  # > 1, so every step runs the positive and negative rows as one batch, as in normal use


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def stock_inputs(graph, checkpoint):
    def encode(text):
        return graph.add("CLIPTextEncode", clip=checkpoint[1], text=text)[0]
    return checkpoint[0], encode("a photo of a dog"), encode("")


def cidm_inputs(library: str, mode: str):
    def build(graph, checkpoint):
        lib = graph.add("CIDM_LoadConceptLibrary", library=library)[0]
        model = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib, tasks="all", scale=0.8,
                          mode=mode, weights="", uncond_weights="match cond")[0]
        positive = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib, text="a photo of a <c00>")[0]
        return model, positive, graph.add("CLIPTextEncode", clip=checkpoint[1], text="")[0]
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, resolution=256, steps=5, repeats=3)
    parser.add_argument("--tasks", default="1,10,25,50", help="library sizes, comma separated (the largest is "
                        "reported)")
    parser.add_argument("--mode", default="named", help="routing mode of Elastic Aggregate LoRAs")
    args = parser.parse_args()
    task_counts = [int(n) for n in args.tasks.split(",")]
    on = basis(args)  # the Timing field the verdicts use: cpu, or wall on a GPU
    largest = f"{max(task_counts)} tasks"

    with BenchServer(args) as bench:
        def sampler(build):
            """Runs KSampler on what `build(graph, checkpoint)` returns: (model, positive, negative)."""
            def run() -> list[Timing]:
                graph, checkpoint = bench.checkpoint_graph()
                model, positive, negative = build(graph, checkpoint)
                latent = graph.add("EmptyLatentImage", width=args.resolution, height=args.resolution, batch_size=1)
                node = graph.add("KSampler", model=model, seed=unique(), steps=args.steps, cfg=CFG,
                                 sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                                 latent_image=latent[0], denoise=1.0)
                graph.add("SaveLatent", samples=node[0], filename_prefix="bench/latent")
                return bench.step_times(graph, node, args.steps)
            return run

        configurations = {"stock": sampler(stock_inputs)}
        for count in task_counts:
            library = f"tasks{count}"
            synthesize_library(bench.ckpt_path, bench.workspace / "models" / "cidm" / library,
                               [f"c{i:02d}" for i in range(count)])
            configurations[f"{count} tasks"] = sampler(cidm_inputs(library, args.mode))
        per_step, steps = seconds_per_step(configurations, args.repeats)

    # Least-squares cost of one more task, as a fraction of the stock step, in CPU and in wall time (with two or more
    # library sizes; `--tasks 50` alone measures only the ratio, where each step costs seconds).
    slopes = Timing(*(least_squares_slope(task_counts, [getattr(per_step[f"{count} tasks"], kind)
                                                        for count in task_counts]) / getattr(per_step["stock"], kind)
                      for kind in Timing._fields)) if len(set(task_counts)) > 1 else None
    print(f"checkpoint {args.layout}, {args.resolution}×{args.resolution}, euler, cfg {CFG}, batch 1, "
          f"{args.device.upper()}, {args.threads} torch thread(s); mode {args.mode}, one concept named; median of "
          f"{len(steps['stock'])} steps per row")
    ratios = print_table(per_step, {name: name for name in per_step}, "stock", on)
    print(f"ratio at {largest}: {ratios[largest].cpu:.3f} (CPU), {ratios[largest].wall:.3f} (wall)   "
          f"{verdict(getattr(ratios[largest], on), 1.05)}")
    if slopes is not None:
        print(f"per added task (least squares over {args.tasks} tasks): {100 * slopes.cpu:+.3f} % of the stock "
              f"step (CPU), {100 * slopes.wall:+.3f} % (wall)   {verdict(100 * getattr(slopes, on), 0.1, ' %')}")
    write_json(args.json, {"layout": args.layout, "resolution": args.resolution, "steps": args.steps, "mode": args.mode,
                           "repeats": args.repeats, "threads": args.threads, "device": args.device,
                           "verdict_basis": on, "seconds_per_step": per_step,
                           "ratio_to_stock": ratios, "slope_fraction_of_stock_per_task": slopes,
                           "step_seconds": steps})


if __name__ == "__main__":
    main()
