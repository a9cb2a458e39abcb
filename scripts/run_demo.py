"""Runs the shipped workflows headless in a real ComfyUI server, in the order a user would: continual
customization (three CIFC concepts trained in sequence into one library, each then generated), composing two of
them in regions, then exporting a concept as a standard LoRA used in a plain sampling graph. The files in workflows/ are converted to API format
here; the CPU-sized settings (test checkpoint, few steps, small images) are applied at run time only.
Outputs land in demo_output/ (printed at the end)."""

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import CIFC, REPO, ComfyServer, ensure_checkpoint, shipped_prompt  # noqa: E402
from workflow_format import cpu_overrides  # noqa: E402

OUT = REPO / "demo_output"
CHECKPOINT = "cidm_mini_sd15.safetensors"
DEMO_WORKFLOWS = ("continual_customization", "region_composition", "export_concept_lora")
SIZE_DIVISOR = 4  # 512×512 latents become 128×128 images


def main() -> int:
    if not (CIFC / "images").is_dir():
        print(f"CIFC data not found at {CIFC} (set CIDM_CIFC); training on drawn stand-in concepts instead")
    if OUT.exists():
        shutil.rmtree(OUT)
    workspace = OUT / "workspace"
    server = ComfyServer(workspace, {CHECKPOINT: ensure_checkpoint("mini")})
    overrides = cpu_overrides(CHECKPOINT, training_steps=12, sampling_steps=8)
    started = time.time()
    server.start()
    try:
        for name in DEMO_WORKFLOWS:
            prompt = shipped_prompt(server, name, overrides, SIZE_DIVISOR)
            entry = server.run(prompt, timeout=1800)
            print(f"{name}: finished after {time.time() - started:.0f}s")
            for path in server.output_files(entry):
                kind = "preview" if path.is_relative_to(workspace / "temp") else "output"  # temp: on-node previews
                print(f"  {kind}: {path}")
            for node_id, node in prompt.items():
                if node["class_type"] == "CIDM_InspectAggregationWeights":
                    for table in entry["outputs"].get(node_id, {}).get("text", []):
                        print(table)  # the per-layer task weights of the inspected prompt
    finally:
        server.stop()
    print(f"concept library: {workspace / 'models' / 'cidm' / 'my-concepts'}")
    print(f"server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
