"""Sampling-step time of two-region compositions against the stock KSampler, in one run of the real server.

Rows: the stock graph (CheckpointLoaderSimple → CLIPTextEncode → KSampler); the Context-Controlled KSampler on a
model with a two-concept library (Elastic Aggregate LoRAs) and CIDM Text Encode prompts, without regions, with two
regions (left and right halves, one concept each) by region-aware cross-attention only, with region noise
estimation only (α 0.1), and with both; region noise estimation on each region's area crop (the default) and on
the whole latent (batched with the global prompt). Goals (issue #14): two regions by attention ≤ 1.3× stock; with region noise
estimation ≤ 2.0× stock. Automatic regions (issue #31): the same prompt naming both concepts with no region drawn,
the regions found by the probe in the run's first steps; goal ≤ 1.25× stock, probe included: its verdict reads the
mean step (the first continued step carries the one-off work between probe and regions), the others the median.

    ~/.cache/cidm-comfyui/venv/bin/python benchmarks/bench_regions.py [--layout full] [--resolution 512]
"""

from __future__ import annotations

import argparse
import statistics

from common import (BenchServer, Timing, basis, common_arguments, print_table, seconds_per_step, unique, verdict,
                    write_json)
from synthetic import synthesize_library

CFG = 5.0  # > 1, so every step runs the positive and negative rows
LIBRARY = "regions"
AUTOMATIC = "2 concepts, automatic regions"
# (alpha, region_attention, region_noise_on) of the Context-Controlled KSampler
VARIANTS = {"no regions": None, "2 regions, attention": (1.0, True, "area crop"),
            "2 regions, noise estimation": (0.1, False, "area crop"),
            "2 regions, attention + noise estimation": (0.1, True, "area crop"),
            "2 regions, noise estimation, whole latent": (0.1, False, "whole latent"),
            "2 regions, attention + noise estimation, whole latent": (0.1, True, "whole latent"),
            AUTOMATIC: (1.0, True, "area crop")}
GOALS = {"2 regions, attention": 1.3, AUTOMATIC: 1.25} | {name: 2.0 for name in VARIANTS if "noise" in name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, resolution=256, steps=4, repeats=2)
    parser.add_argument("--mode", default="named", help="routing mode of Elastic Aggregate LoRAs")
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="rows besides stock, separated by ';' (default: all), e.g. 'no regions;2 regions, "
                             "attention' where each step costs seconds (SDXL on a CPU)")
    args = parser.parse_args()
    variants = [name.strip() for name in args.variants.split(";")]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {'; '.join(VARIANTS)}")
    on = basis(args)  # the Timing field the verdicts use: cpu, or wall on a GPU

    with BenchServer(args) as bench:
        synthesize_library(bench.ckpt_path, bench.workspace / "models" / "cidm" / LIBRARY, ["dog", "duck"])

        def sampler(variant):
            def run() -> list[Timing]:
                graph, checkpoint = bench.checkpoint_graph()
                latent = graph.add("EmptyLatentImage", width=args.resolution, height=args.resolution, batch_size=1)
                common = dict(seed=unique(), steps=args.steps, cfg=CFG, sampler_name="euler", scheduler="normal",
                              latent_image=latent[0], denoise=1.0)
                if variant == "stock":
                    def encode(text):
                        return graph.add("CLIPTextEncode", clip=checkpoint[1], text=text)[0]
                    node = graph.add("KSampler", model=checkpoint[0], positive=encode("a dog and a duck"),
                                     negative=encode(""), **common)
                else:
                    lib = graph.add("CIDM_LoadConceptLibrary", library=LIBRARY)[0]
                    model = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib, tasks="all",
                                      scale=0.8, mode=args.mode, weights="", uncond_weights="match cond")[0]

                    def encode(text):
                        return graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib, text=text)[0]
                    regions = {}
                    alpha, attention, region_noise = VARIANTS[variant] or (1.0, True, "area crop")
                    if VARIANTS[variant] is not None and variant != AUTOMATIC:
                        left = graph.add("CIDM_RegionCondition", conditioning=encode("a photo of a <dog>"), x=0.0,
                                         y=0.0, width=0.5, height=1.0, strength=1.0)
                        right = graph.add("CIDM_RegionCondition", conditioning=encode("a photo of a <duck>"), x=0.5,
                                          y=0.0, width=0.5, height=1.0, strength=1.0, regions=left[0])
                        regions = {"regions": right[0]}
                    node = graph.add("CIDM_ContextControlledKSampler", model=model,
                                     positive=encode("a <dog> and a <duck>"),
                                     negative=graph.add("CLIPTextEncode", clip=checkpoint[1], text="")[0],
                                     alpha=alpha, region_attention=attention, region_noise_on=region_noise,
                                     auto_regions=variant == AUTOMATIC, **common, **regions)
                graph.add("SaveLatent", samples=node[0], filename_prefix="bench/latent")
                return bench.step_times(graph, node, args.steps)
            return run

        configurations = {"stock": sampler("stock")} | {name: sampler(name) for name in variants}
        per_step, steps = seconds_per_step(configurations, args.repeats)

    print(f"checkpoint {args.layout}, {args.resolution}×{args.resolution}, euler, cfg {CFG}, batch 1, "
          f"{args.device.upper()}, {args.threads} torch thread(s), routing {args.mode}; median of "
          f"{len(steps['stock'])} steps per row")
    ratios = print_table(per_step, {"stock": "stock KSampler"} | {name: name for name in variants}, "stock", on)
    means = {name: Timing(*(statistics.mean(getattr(t, kind) for t in timings) for kind in Timing._fields))
             for name, timings in steps.items()}
    mean_ratios = {name: Timing(*(value / base for value, base in zip(timing, means["stock"])))
                   for name, timing in means.items()}
    for name, goal in ((name, goal) for name, goal in GOALS.items() if name in variants):
        read = mean_ratios[name] if name == AUTOMATIC else ratios[name]
        print(f"{name}: {read.cpu:.3f} (CPU), {read.wall:.3f} (wall){' (mean step)' if name == AUTOMATIC else ''}"
              f"   {verdict(getattr(read, on), goal)}")
    write_json(args.json, {"layout": args.layout, "resolution": args.resolution, "steps": args.steps,
                           "repeats": args.repeats, "threads": args.threads, "device": args.device,
                           "verdict_basis": on, "mode": args.mode, "variants": variants,
                           "seconds_per_step": per_step, "ratio_to_stock": ratios, "goals": GOALS,
                           "mean_seconds_per_step": means, "mean_ratio_to_stock": mean_ratios,
                           "step_seconds": steps})


if __name__ == "__main__":
    main()
