"""Training-step time of Train Concept Increment (method cidm, on a library that already holds one task, so the
consolidation loss is active) against stock ComfyUI's TrainLoraNode in one run of the real server: same checkpoint,
same two images and caption at the same resolution, batch size 1, rank 4, fp32, no gradient checkpointing. Also
prints the size of the new concept's task file (fp16) and each trainer's peak resident memory. Goals: cidm/stock
≤ 1.10 per step on SD1.5 and ≤ 1.3 on SDXL (issue 30), task file ≤ 1 MB, peak memory ≤ 1.3× stock (issue 30).

    ~/.cache/cidm-comfyui/venv/bin/python benchmarks/bench_training.py [--layout sd15-blocks] [--resolution 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (SDXL_LAYOUTS, BenchServer, Timing, common_arguments, print_table, seconds_per_step, unique, verdict,
                    write_json)
from comfy_host import stage
from pack_workflows import TRAIN_OPTIONS, add_trainer
from synthetic import checkpoint_layers, synthesize_library

RANK = 4
LEARNING_RATE = 1e-4
CAPTION = "a photo of a dog"
MEMORY_GOAL = 1.3  # peak resident memory, cidm / stock (issue 30)


def stage_two_images(workspace) -> tuple[str, list[str]]:
    """Two CIFC dog images under input/, both captioned CAPTION: every trainer sees the same data and prompt."""
    folder = stage(workspace, "dog", subfolder="bench-dog")
    images = sorted(p for p in (workspace / "input" / folder).iterdir() if p.suffix != ".txt")
    for extra in images[2:]:
        extra.unlink()
        extra.with_suffix(".txt").unlink(missing_ok=True)
    for image in images[:2]:
        image.with_suffix(".txt").write_text(CAPTION)
    return folder, [p.name for p in images[:2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, resolution=128, steps=6, repeats=3)
    parser.add_argument("--per-layer-slots", action="store_true",
                        help="also time cidm with one token slot per layer (on SDXL the default is one per "
                             "transformer stack, cidm.family)")
    args = parser.parse_args()

    with BenchServer(args) as bench:
        folder, names = stage_two_images(bench.workspace)
        task_files: dict[str, Path] = {}  # the new task file of each cidm configuration's latest run

        def cidm(name: str, embedding_lr: float, per_layer_slots: bool = False):
            def run() -> list[Timing]:
                # Every run appends to a fresh one-task library; the new name also keeps ComfyUI's cache out. The
                # new concept trains with the library's token slots: the family's default, or one per layer.
                library = f"bench{unique()}"
                root = bench.workspace / "models" / "cidm" / library
                layers = len(checkpoint_layers(bench.ckpt_path)[0])
                synthesize_library(bench.ckpt_path, root, ["old"], rank=RANK,
                                   token_slots=list(range(layers)) if per_layer_slots else None)
                graph, checkpoint = bench.checkpoint_graph()
                lib = graph.add("CIDM_LoadConceptLibrary", library=library)
                node = add_trainer(graph, checkpoint, lib[0], "dog", folder, method="cidm", steps=args.steps,
                                   rank=RANK, resolution=args.resolution, lora_lr=LEARNING_RATE,
                                   embedding_lr=embedding_lr)
                graph.add("PreviewImage", images=node[1])
                steps = bench.step_times(graph, node, args.steps)
                task_files[name] = root / "task_002_dog.safetensors"
                return steps
            return run

        def stock() -> list[Timing]:
            graph, checkpoint = bench.checkpoint_graph()
            scaled = [graph.add("ImageScale", image=graph.add("LoadImage", image=f"{folder}/{name}")[0],
                                upscale_method="bilinear", width=args.resolution, height=args.resolution,
                                crop="center")[0] for name in names]
            batch = graph.add("ImageBatch", image1=scaled[0], image2=scaled[1])
            encoded = graph.add("VAEEncode", pixels=batch[0], vae=checkpoint[2])
            # v0.3.75 TrainLoraNode takes every input as a list. One LATENT input (a list of one) goes down its
            # "single latent" branch, which never assigns `multi_res`, so the node dies with UnboundLocalError.
            # RebatchLatents outputs a list of one-image latents, which takes the working list branch instead.
            latents = graph.add("RebatchLatents", latents=encoded[0], batch_size=1)
            positive = graph.add("CLIPTextEncode", clip=checkpoint[1], text=CAPTION)
            node = graph.add("TrainLoraNode", model=checkpoint[0], latents=latents[0], positive=positive[0],
                             batch_size=1, grad_accumulation_steps=1, steps=args.steps, learning_rate=LEARNING_RATE,
                             rank=RANK, optimizer="AdamW", loss_function="MSE", seed=unique(), training_dtype="fp32",
                             lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=False,
                             existing_lora="[None]")
            graph.add("SaveLoRA", lora=node[1], prefix=f"bench/stock{unique()}", steps=node[3])
            return bench.step_times(graph, node, args.steps)

        memory = {}

        def measured(name, run):
            def wrapped() -> list[Timing]:
                steps = run()
                memory.setdefault(name, []).append(bench.last_memory)
                return steps
            return wrapped
        runs = {"stock": stock, "cidm": cidm("cidm", TRAIN_OPTIONS["embedding_lr"]),
                "cidm frozen tokens": cidm("cidm frozen tokens", 0.0)}
        if args.per_layer_slots:
            runs["cidm per-layer slots"] = cidm("cidm per-layer slots", TRAIN_OPTIONS["embedding_lr"],
                                                per_layer_slots=True)
        per_step, steps = seconds_per_step({name: measured(name, run) for name, run in runs.items()}, args.repeats)
        size = task_files["cidm"].stat().st_size  # the default configuration's

    print(f"checkpoint {args.layout}, {args.resolution}×{args.resolution}, batch 1, rank {RANK}, fp32, CPU, "
          f"{args.threads} torch thread(s); median of {len(steps['stock'])} steps per row")
    labels = {"stock": "stock TrainLoraNode", "cidm": "Train Concept Increment, cidm",
              "cidm frozen tokens": "  same, tokens frozen (embedding_lr 0)",
              "cidm per-layer slots": "  same, one token slot per layer"}
    ratios = print_table(per_step, {name: label for name, label in labels.items() if name in per_step}, "stock")
    goal = 1.3 if args.layout in SDXL_LAYOUTS else 1.10
    print(f"ratio cidm / stock: {ratios['cidm'].cpu:.3f} (CPU), {ratios['cidm'].wall:.3f} (wall)   "
          f"{verdict(ratios['cidm'].cpu, goal)}")
    # A configuration's peak is the least over its runs: its first run may also load the checkpoint.
    peaks = {name: min(m.peak for m in kept) for name, kept in memory.items()}
    for name, kept in memory.items():
        print(f"peak resident memory, {name}: {peaks[name] / 2**30:.2f} GiB (least of {len(kept)} runs; "
              f"{max(m.peak - m.start for m in kept) / 2**30:.2f} GiB at most above the resident set at submission)")
    memory_ratio = peaks["cidm"] / peaks["stock"]
    print(f"peak memory cidm / stock: {memory_ratio:.3f}   {verdict(memory_ratio, MEMORY_GOAL)}")
    print(f"new task file (fp16): {size} bytes = {size / 1e6:.3f} MB   {verdict(size / 1e6, 1, ' MB')}")
    write_json(args.json, {"layout": args.layout, "resolution": args.resolution, "steps": args.steps,
                           "repeats": args.repeats, "threads": args.threads, "seconds_per_step": per_step,
                           "ratio_to_stock": ratios, "goal": goal, "task_file_bytes": size, "step_seconds": steps,
                           "memory_bytes": memory, "peak_memory_bytes": peaks, "peak_memory_ratio": memory_ratio,
                           "memory_goal": MEMORY_GOAL})


if __name__ == "__main__":
    main()
