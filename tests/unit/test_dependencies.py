"""Dependencies that earn their place (issue 16, kind 10).

- requirements.txt (what ComfyUI-Manager installs for every user) lists exactly the distributions the nodes
  import, and pyproject's dependencies are the same list; the diffusers backend, the toy world and the tests
  take theirs from the `diffusers` and `test` extras, each of which is used.
- Installing requirements.txt next to a CPU or CUDA torch, recent or old, changes no torch package
  (`pip install --dry-run --report` against stand-in environments that hold only a torch of that version).
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfyui_version", "folder_paths", "latent_preview",
                   "node_helpers", "server", "execution"}
LOCAL_MODULES = {p.stem for p in REPO.rglob("*.py")} | {p.name for p in REPO.iterdir() if p.is_dir()}
HOST_PROVIDED = {"torch"}  # the user's ComfyUI brings it; the pack must never install one
# Used by the code an extra serves without an import statement of its own.
USED_WITHOUT_IMPORT = {"peft": "diffusers' load_lora_into_unet needs it (tests/unit/test_export.py)"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines) -> set[str]:
    return {normalize(re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0]) for line in lines
            if line.strip() and not line.lstrip().startswith("#")}


def imported_distributions(paths) -> set[str]:
    """The distributions providing the third-party modules that `paths` import (absolute imports only)."""
    providers = importlib.metadata.packages_distributions()
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for top in (module.split(".")[0] for module in modules):
                if top in sys.stdlib_module_names or top in COMFYUI_MODULES | LOCAL_MODULES | HOST_PROVIDED:
                    continue
                assert top in providers, f"{path.relative_to(REPO)} imports {top}, which no installed package provides"
                found.update(normalize(name) for name in providers[top])
    return found


def python_files(*roots, exclude=()):
    return [p for root in roots for p in ([REPO / root] if root.endswith(".py") else (REPO / root).rglob("*.py"))
            if not any(p.is_relative_to(REPO / e) for e in exclude)]


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = requirement_names((REPO / "requirements.txt").read_text().splitlines())
EXTRAS = {name: requirement_names(lines) for name, lines in PYPROJECT.get("optional-dependencies", {}).items()}


def test_requirements_are_what_the_nodes_import():
    node_side = python_files("__init__.py", "nodes", "cidm", exclude=["cidm/backends/diffusers_backend.py"])
    assert imported_distributions(node_side) == REQUIREMENTS
    assert requirement_names(PYPROJECT["dependencies"]) == REQUIREMENTS


def test_every_extra_is_used_and_none_repeats_the_requirements():
    served = {"diffusers": python_files("cidm/backends", "benchmarks"), "test": python_files("tests", "scripts")}
    assert set(EXTRAS) == set(served)
    for extra, paths in served.items():
        unused = EXTRAS[extra] - imported_distributions(paths) - set(USED_WITHOUT_IMPORT)
        assert not unused, f"extra {extra!r} declares {unused}, which its code never imports"
        assert not EXTRAS[extra] & REQUIREMENTS
    assert "load_lora_into_unet" in (REPO / "tests" / "unit" / "test_export.py").read_text()


def stand_in_environment(root: Path, torch_version: str) -> Path:
    """A bare venv whose only package is a torch of `torch_version` (metadata alone: resolution never imports)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    purelib = subprocess.run([str(root / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    info = Path(purelib) / f"torch-{torch_version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    return root / "bin" / "python"


@pytest.mark.parametrize("torch_version", ["2.13.0", "2.4.1+cu121", "1.13.1+cu117"])
def test_installing_requirements_changes_no_torch_package(tmp_path, torch_version):
    target = stand_in_environment(tmp_path / "env", torch_version)
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(target), "install", "--dry-run",
                             "--quiet", "--report", str(report), "-r", str(REPO / "requirements.txt")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = {normalize(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert REQUIREMENTS <= installed  # the stand-in holds nothing else, so resolution installs them all
    touched = sorted(n for n in installed if n.startswith(("torch", "nvidia-", "triton", "cuda-")))
    assert not touched, f"installing requirements.txt next to torch {torch_version} would install {touched}"
