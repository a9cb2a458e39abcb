"""Training-step time of Train Concept Increment (method cidm, on a library that already holds one task, so the
consolidation loss is active) against stock ComfyUI's TrainLoraNode in one run of the real server: same checkpoint,
same images at the same resolution, batch size 1, rank 4, fp32, no gradient checkpointing. Also prints the size of
the new concept's task file (fp16). Goals: cidm/stock ≤ 1.10 per step, task file ≤ 1 MB.

    ~/.cache/cidm-comfyui/venv/bin/python benchmarks/bench_training.py [--layout sd15-blocks] [--resolution 128]
"""

from __future__ import annotations

import argparse

from common import BenchServer, common_arguments, median, seconds_per_step, unique, write_json
from pack_workflows import TRAIN_DEFAULTS, stage
from synthetic import synthesize_library

RANK = 4
LEARNING_RATE = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, resolution=128, steps=3, repeats=3)
    args = parser.parse_args()

    with BenchServer(args.layout) as bench:
        folder = stage(bench.workspace, "dog")
        names = sorted(p.name for p in (bench.workspace / "input" / folder).iterdir() if p.suffix != ".txt")[:2]
        libraries = bench.workspace / "models" / "cidm"
        trained = []

        def images(graph):
            """The same two images, scaled and centre-cropped to the resolution, for both trainers."""
            scaled = [graph.add("ImageScale", image=graph.add("LoadImage", image=f"{folder}/{name}")[0],
                                upscale_method="bilinear", width=args.resolution, height=args.resolution,
                                crop="center")[0] for name in names]
            return graph.add("ImageBatch", image1=scaled[0], image2=scaled[1])[0]

        def cidm(steps: int) -> float:
            # Each run appends to a fresh copy of a one-task library: the new name also defeats the cache.
            library = f"bench{unique()}"
            synthesize_library(bench.ckpt_path, libraries / library, ["old"], rank=RANK)
            graph, checkpoint = bench.checkpoint_graph()
            lib = graph.add("CIDM_LoadConceptLibrary", library=library)
            node = graph.add("CIDM_TrainConceptIncrement", model=checkpoint[0], clip=checkpoint[1],
                             vae=checkpoint[2], library=lib[0], concept="dog", images=images(graph), folder="",
                             **{**TRAIN_DEFAULTS, "steps": steps, "resolution": args.resolution, "rank": RANK,
                                "lora_lr": LEARNING_RATE, "method": "cidm"})
            graph.add("PreviewImage", images=node[1])
            seconds = bench.seconds(graph)
            trained.append(libraries / library / "task_002_dog.safetensors")
            return seconds

        def stock(steps: int) -> float:
            graph, checkpoint = bench.checkpoint_graph()
            encoded = graph.add("VAEEncode", pixels=images(graph), vae=checkpoint[2])
            # v0.3.75 TrainLoraNode takes every input as a list. One LATENT input (a list of one) goes down its
            # "single latent" branch, which never assigns `multi_res`, so the node dies with UnboundLocalError.
            # RebatchLatents outputs a list of one-image latents, which takes the working list branch instead.
            latents = graph.add("RebatchLatents", latents=encoded[0], batch_size=1)
            positive = graph.add("CLIPTextEncode", clip=checkpoint[1], text="a photo of a dog")
            node = graph.add("TrainLoraNode", model=checkpoint[0], latents=latents[0], positive=positive[0],
                             batch_size=1, grad_accumulation_steps=1, steps=steps, learning_rate=LEARNING_RATE,
                             rank=RANK, optimizer="AdamW", loss_function="MSE", seed=unique(), training_dtype="fp32",
                             lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=False,
                             existing_lora="[None]")
            graph.add("SaveLoRA", lora=node[1], prefix=f"bench/stock{unique()}", steps=node[3])
            return bench.seconds(graph)

        samples = seconds_per_step({"stock": stock, "cidm": cidm}, args.steps, args.repeats)
        size = trained[-1].stat().st_size

    stock_step, cidm_step = median(samples["stock"]), median(samples["cidm"])
    ratio = cidm_step / stock_step
    print(f"checkpoint {args.layout}, {args.resolution}×{args.resolution}, batch 1, rank {RANK}, fp32, CPU; "
          f"per step = (t({2 * args.steps} steps) − t({args.steps} steps)) / {args.steps}, median of {args.repeats}")
    print(f"{'stock TrainLoraNode':<34}{stock_step:9.3f} s/step")
    print(f"{'Train Concept Increment (cidm)':<34}{cidm_step:9.3f} s/step   (1 old task: consolidation active)")
    print(f"{'ratio cidm / stock':<34}{ratio:9.3f}          goal ≤ 1.10  {'ok' if ratio <= 1.10 else 'MISSED'}")
    print(f"{'new task file (fp16)':<34}{size:9d} bytes = {size / 1e6:.3f} MB   goal ≤ 1 MB  "
          f"{'ok' if size <= 1e6 else 'MISSED'}")
    write_json(args.json, {"layout": args.layout, "resolution": args.resolution, "steps": args.steps,
                           "repeats": args.repeats, "stock_seconds_per_step": stock_step,
                           "cidm_seconds_per_step": cidm_step, "ratio": ratio, "samples": samples,
                           "task_file_bytes": size})


if __name__ == "__main__":
    main()
