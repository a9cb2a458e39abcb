"""ComfyUI node schemas for the pack; each file is one node family and only translates to cidm/."""
