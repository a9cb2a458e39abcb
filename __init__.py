"""CIDM continual concept customization for ComfyUI (V3 node pack entry point).

Nothing heavy happens at import: the node classes load on `comfy_entrypoint`. The pack needs ComfyUI's V3 node
API (`comfy_api.latest`); inside a ComfyUI without it, the import logs an error saying which ComfyUI version is
needed instead of leaving the user with silently missing nodes. Outside ComfyUI (a test collector) it exposes
nothing. `web/` holds the frontend extension that shows Inspect Aggregation Weights' table on the node.
"""

import logging
import sys

WEB_DIRECTORY = "./web"

TESTED_COMFYUI = "0.3.75"  # the pinned host of scripts/setup_host.sh; the oldest version the pack is known to run on


def _comfyui_version() -> str:
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown"
    return __version__


try:
    from comfy_api.latest import ComfyExtension, io, ui

    _missing = [name for name, owner in (("io.ComfyNode", io), ("io.Custom", io), ("ui.PreviewImage", ui))
                if not hasattr(owner, name.split(".")[1])]
except ImportError as error:
    ComfyExtension, _missing = None, [f"comfy_api.latest ({error})"]

if _missing and "folder_paths" in sys.modules:  # inside a ComfyUI that is too old for the pack
    logging.getLogger(__name__).error(
        "CIDM Continual Concepts is not loaded: it needs ComfyUI %s or newer (the V3 node API, "
        "comfy_api.latest), and this ComfyUI (version %s) lacks %s. Update ComfyUI, then restart it.",
        TESTED_COMFYUI, _comfyui_version(), ", ".join(_missing))

if not _missing:
    class CIDMExtension(ComfyExtension):
        async def on_load(self) -> None:
            from .nodes.common import register_library_folder
            register_library_folder()

        async def get_node_list(self):
            from .nodes import aggregation_nodes, evaluation_nodes, library_nodes, region_nodes
            return (library_nodes.NODES + aggregation_nodes.NODES + region_nodes.NODES
                    + evaluation_nodes.NODES)

    async def comfy_entrypoint() -> CIDMExtension:
        return CIDMExtension()
