"""Runs the example workflow headless in a real ComfyUI server: two CIFC concepts trained in sequence into one
library, aggregated, and composed by region. Outputs land in demo_output/ (printed at the end)."""

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import CIFC, REPO, ComfyServer, ensure_checkpoint, stage  # noqa: E402

OUT = REPO / "demo_output"
WORKFLOW = REPO / "workflows" / "continual_concepts_api.json"


def main() -> int:
    if not (CIFC / "images").is_dir():
        print(f"CIFC data not found at {CIFC} (set CIDM_CIFC); training on drawn stand-in concepts instead")
    if OUT.exists():
        shutil.rmtree(OUT)
    workspace = OUT / "workspace"
    server = ComfyServer(workspace, {"cidm_mini_sd15.safetensors": ensure_checkpoint("mini")})
    for concept in ("dog", "duck_toy"):
        stage(workspace, concept)
    started = time.time()
    server.start()
    try:
        entry = server.run(json.loads(WORKFLOW.read_text()), timeout=1800)
    finally:
        server.stop()
    outputs = server.output_files(entry)
    print(f"demo finished in {time.time() - started:.0f}s")
    print(f"concept library: {workspace / 'models' / 'cidm' / 'demo-concepts'}")
    for path in outputs:
        kind = "preview" if path.is_relative_to(workspace / "temp") else "output"  # temp: training previews
        print(f"{kind}: {path}")
    for table in entry["outputs"].get("16", {}).get("text", []):
        print(table)  # Inspect Aggregation Weights: the per-layer task weights for the duck prompt
    print(f"server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
