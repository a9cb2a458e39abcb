import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cidm_imports_with_comfyui_absent():
    # A fresh interpreter whose import system refuses every ComfyUI module: importing all of cidm must still work.
    script = """
import importlib, pkgutil, sys
class RefuseComfy:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'comfy', 'comfy_api', 'comfy_extras', 'folder_paths', 'nodes', 'server',
                                  'execution', 'latent_preview', 'node_helpers'}:
            raise ImportError('ComfyUI is absent: ' + name)
sys.meta_path.insert(0, RefuseComfy())
import cidm
for module in pkgutil.iter_modules(cidm.__path__):
    importlib.import_module('cidm.' + module.name)
print('ok', sorted(m for m in sys.modules if m.startswith('cidm')))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cidm.train" in result.stdout and "cidm.adapters" in result.stdout
