#!/usr/bin/env bash
# Runs the test suite: installs the pinned ComfyUI host if needed (idempotent), then pytest in the host venv.
# Extra arguments go to pytest, e.g. `scripts/test.sh --run-slow` for the slow tier.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$(realpath -m "${CIDM_CACHE:-$HOME/.cache/cidm-comfyui}")
bash "$REPO/scripts/setup_host.sh" "$CACHE"
bash "$REPO/scripts/setup_browser.sh"
cd "$REPO"
export CIDM_CACHE="$CACHE" HF_HUB_OFFLINE=1
exec "$CACHE/venv/bin/python" -m pytest "$@"
