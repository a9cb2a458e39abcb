"""CIDM continual concept customization: the method, importable without ComfyUI.

Modules use relative imports only, because inside ComfyUI this package is loaded as a sub-package of the
custom-node folder, not as a top-level `cidm`.
"""

__version__ = "0.1.0"
