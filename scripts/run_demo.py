"""Runs the example workflow headless in a real ComfyUI server: two CIFC concepts trained in sequence into one
library, aggregated, and composed by region. Outputs land in demo_output/ (printed at the end)."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import REPO, ComfyServer, ensure_checkpoint  # noqa: E402

CIFC = Path(os.environ.get("CIDM_CIFC", REPO.parent / "shared" / "datasets" / "cifc"))
OUT = REPO / "demo_output"
WORKFLOW = REPO / "workflows" / "continual_concepts_api.json"


def stage_concept(workspace: Path, concept: str) -> None:
    """Copies one CIFC concept's images and captions into the server's input folder (never into the repo)."""
    target = workspace / "input" / "cifc" / concept
    target.mkdir(parents=True, exist_ok=True)
    for folder in ("images", "caption"):
        for file in (CIFC / folder / concept).iterdir():
            shutil.copy2(file, target / file.name)


def main() -> int:
    if not (CIFC / "images").is_dir():
        print(f"CIFC data not found at {CIFC}; set CIDM_CIFC to the datasets/cifc folder", file=sys.stderr)
        return 2
    if OUT.exists():
        shutil.rmtree(OUT)
    workspace = OUT / "workspace"
    server = ComfyServer(workspace, {"cidm_mini_sd15.safetensors": ensure_checkpoint("mini")})
    for concept in ("dog", "duck_toy"):
        stage_concept(workspace, concept)
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
        print(f"output: {path}")
    table = entry["outputs"].get("16", {})
    if table:
        print(json.dumps(table, indent=1)[:2000])
    print(f"server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
