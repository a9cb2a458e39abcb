"""The pack's __init__ inside a ComfyUI that lacks the V3 node API: a logged error naming the version needed.

Each case runs in a fresh interpreter with stand-in ComfyUI modules on sys.path (the real ComfyUI never enters the
pytest process); the real server's loading is covered by tests/integration/test_pack_loads.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LOAD_PACK = f"""
import importlib.util, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
if {{inside}}:
    import folder_paths  # ComfyUI's main.py has imported it before it loads custom nodes
spec = importlib.util.spec_from_file_location("comfyui_cidm", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)
print("entrypoint:", hasattr(pack, "comfy_entrypoint"))
"""

OLD_LATEST = "class ComfyExtension:\n    pass\nclass io:\n    pass\nui = io\n"  # V3 in the making: no io.Custom


def load_pack(tmp_path, files: dict[str, str], inside: bool = True) -> str:
    for name, text in {"folder_paths.py": "", **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = subprocess.run([sys.executable, "-c", LOAD_PACK.format(inside=inside)], cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("files,lacking", [
    ({}, "comfy_api.latest (No module named 'comfy_api')"),
    ({"comfy_api/__init__.py": ""}, "comfy_api.latest (No module named 'comfy_api.latest')"),
    ({"comfy_api/__init__.py": "", "comfy_api/latest.py": OLD_LATEST}, "io.ComfyNode, io.Custom, ui.PreviewImage"),
])
def test_too_old_comfyui_logs_the_version_needed(tmp_path, files, lacking):
    out = load_pack(tmp_path, {"comfyui_version.py": '__version__ = "0.3.40"\n', **files})
    assert "ERROR CIDM Continual Concepts is not loaded: it needs ComfyUI 0.3.75 or newer" in out
    assert f"this ComfyUI (version 0.3.40) lacks {lacking}" in out
    assert "entrypoint: False" in out


def test_comfyui_without_a_version_module(tmp_path):
    out = load_pack(tmp_path, {})
    assert "this ComfyUI (version unknown) lacks comfy_api.latest" in out


def test_outside_comfyui_the_import_is_silent(tmp_path):
    out = load_pack(tmp_path, {}, inside=False)
    assert out.strip() == "entrypoint: False"
