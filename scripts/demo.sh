#!/usr/bin/env bash
# The headless demo: installs the pinned ComfyUI host if needed, generates the default test checkpoint, then runs
# the shipped UI-format workflows (workflows/*.json, converted at run time) in a real ComfyUI server.
# Outputs: demo_output/ in the repo.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$(realpath -m "${CIDM_CACHE:-$HOME/.cache/cidm-comfyui}")
bash "$REPO/scripts/setup_host.sh" "$CACHE"
export CIDM_CACHE="$CACHE" HF_HUB_OFFLINE=1
exec "$CACHE/venv/bin/python" "$REPO/scripts/run_demo.py" "$@"
