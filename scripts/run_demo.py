"""Runs the shipped workflows headless in a real ComfyUI server, in the order a user would: continual
customization (three CIFC concepts trained in sequence into one library, each then generated), composing two of
them in regions, then exporting a concept as a standard LoRA used in a plain sampling graph, then three tasks with
an evaluation after each; then the SDXL versions
of the first two on an SDXL-layout test checkpoint. The files in workflows/ are converted to API format here; the
CPU-sized settings (test checkpoints, few steps, small images) are applied at run time only. Outputs land in
demo_output/ (printed at the end)."""

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import CIFC, REPO, ComfyServer, ensure_checkpoint, shipped_prompt  # noqa: E402
from workflow_format import cpu_overrides  # noqa: E402

OUT = REPO / "demo_output"
CHECKPOINT = "cidm_mini_sd15.safetensors"
# SDXL's 70 cross-attention layers in a 283 M UNet, with small text towers (scripts/make_test_checkpoint.py)
SDXL_CHECKPOINT = "cidm_sdxl_blocks.safetensors"
SDXL_LOADER = "CIDMTest_SmallTowerCheckpointLoader"
# (workflow, overrides, size divisor): 512×512 latents become 128×128 images, SDXL's 1024×1024 become 128×128 too
DEMO_WORKFLOWS = (
    ("continual_customization", cpu_overrides(CHECKPOINT, training_steps=12, sampling_steps=8), 4),
    ("region_composition", cpu_overrides(CHECKPOINT, training_steps=12, sampling_steps=8), 4),
    ("region_composition_auto", cpu_overrides(CHECKPOINT, training_steps=12, sampling_steps=8), 4),
    ("export_concept_lora", cpu_overrides(CHECKPOINT, training_steps=12, sampling_steps=8), 4),
    # the CLIP vision file swapped for a random-weight model of ComfyUI's own class, made at run time
    ("continual_evaluation", {**cpu_overrides(CHECKPOINT, training_steps=12, sampling_steps=8),
                              "CLIPVisionLoader": {"class_type": "CIDMTest_SmallClipVision"}}, 4),
    ("continual_customization_sdxl", cpu_overrides(SDXL_CHECKPOINT, training_steps=4, sampling_steps=4,
                                                   loader=SDXL_LOADER), 8),
    ("region_composition_sdxl", cpu_overrides(SDXL_CHECKPOINT, training_steps=4, sampling_steps=4,
                                              loader=SDXL_LOADER), 8),
)


def main() -> int:
    if not (CIFC / "images").is_dir():
        print(f"CIFC data not found at {CIFC} (set CIDM_CIFC); training on drawn stand-in concepts instead")
    if OUT.exists():
        shutil.rmtree(OUT)
    workspace = OUT / "workspace"
    server = ComfyServer(workspace, {CHECKPOINT: ensure_checkpoint("mini"),
                                     SDXL_CHECKPOINT: ensure_checkpoint("sdxl-blocks")})
    started = time.time()
    server.start()
    try:
        for name, overrides, divisor in DEMO_WORKFLOWS:
            prompt = shipped_prompt(server, name, overrides, divisor)
            entry = server.run(prompt, timeout=1800)
            print(f"{name}: finished after {time.time() - started:.0f}s")
            for path in server.output_files(entry):
                kind = "preview" if path.is_relative_to(workspace / "temp") else "output"  # temp: on-node previews
                print(f"  {kind}: {path}")
            for node_id, node in prompt.items():
                if node["class_type"] in ("CIDM_InspectAggregationWeights", "CIDM_ContextControlledKSampler",
                                          "CIDM_EvaluateConceptLibrary"):
                    for table in entry["outputs"].get(node_id, {}).get("text", []):
                        print(table)  # inspected task weights; a sampler's note; an evaluation's report
    finally:
        server.stop()
    print(f"concept libraries: {workspace / 'models' / 'cidm' / 'my-concepts'}, "
          f"{workspace / 'models' / 'cidm' / 'my-sdxl-concepts'}")
    print(f"server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
