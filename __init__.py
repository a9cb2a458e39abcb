"""CIDM continual concept customization for ComfyUI (V3 node pack entry point).

Nothing heavy happens at import: the node classes load on `comfy_entrypoint`.
"""

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (e.g. by a test collector): expose nothing
    ComfyExtension = None

if ComfyExtension is not None:
    class CIDMExtension(ComfyExtension):
        async def on_load(self) -> None:
            from .nodes.common import register_library_folder
            register_library_folder()

        async def get_node_list(self):
            from .nodes import aggregation_nodes, library_nodes, region_nodes
            return library_nodes.NODES + aggregation_nodes.NODES + region_nodes.NODES

    async def comfy_entrypoint() -> CIDMExtension:
        return CIDMExtension()
