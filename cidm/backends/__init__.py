"""Model backends for cidm outside ComfyUI (ComfyUI's own adapter lives in the pack's nodes/)."""
