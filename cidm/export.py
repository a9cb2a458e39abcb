"""Export of one task as a standard LoRA file that ComfyUI's stock LoraLoader reads.

Keys are kohya-style `lora_unet_<LDM module path with underscores>` with `.lora_down.weight`, `.lora_up.weight`
and `.alpha`. Loaders scale by alpha/rank, so alpha is written as rank·multiplier to reproduce h = Wx + m·BAx.
What the format cannot carry: the layer-wise concept token embeddings (one per cross-attention layer). A stock
LoRA applies to every prompt, so the concept is invoked by the class word, not by its tokens.
"""

from __future__ import annotations

import torch

from .adapters import TaskFactors

EXPORT_NOTE = ("layer-wise concept tokens are not part of the standard LoRA format; this file holds only the "
               "cross-attention LoRA and applies to every prompt")


def standard_lora_state_dict(lora: TaskFactors, layer_paths: list[str], multiplier: float,
                             dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    state = {}
    for (layer, proj), (down, up) in sorted(lora.items()):
        name = "lora_unet_" + f"{layer_paths[layer]}.{proj}".replace(".", "_")
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]) * multiplier)
    return state
