"""Finds the UNet's cross-attention (attn2) layers in CIDM's layer order.

The order is down/input blocks, then the middle block, then up/output blocks, in forward order: the order in
which the official CIDM code indexes its layer-wise tokens (JiahuaDong/CIFC@9819aa8 `lib/models/edlora.py`
`revise_edlora_unet_attention_forward`: down_blocks, mid_block, up_blocks). The count is read from the model (16
for SD1.5, 70 for SDXL, 4 for the mini test UNet), never assumed. A layer is known by its module path: ComfyUI's
`transformer_options["transformer_index"]` counts SpatialTransformers, not layers (0..10 on SDXL, whose stacks
hold up to 10 layers; comfy/ldm/modules/diffusionmodules/openaimodel.py:41-46, v0.3.75), so nothing keys on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import CIDMInputError

# ComfyUI (LDM) and diffusers names of the three UNet stages, in forward order.
_STAGE_PREFIXES = (("input_blocks", "down_blocks"), ("middle_block", "mid_block"), ("output_blocks", "up_blocks"))
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class CrossAttentionLayer:
    index: int
    path: str  # dotted path from the UNet root, e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    query_dim: int
    context_dim: int
    heads: int

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each adapted projection."""
        inner = self.query_dim
        return {"to_q": (inner, self.query_dim), "to_k": (inner, self.context_dim),
                "to_v": (inner, self.context_dim), "to_out.0": (self.query_dim, inner)}


def _stage(path: str) -> int | None:
    """0/1/2 for down/mid/up from the first path part that names a stage, so wrapped UNets (x.unet.down_blocks…)
    are found too."""
    for part in path.split("."):
        for stage, names in enumerate(_STAGE_PREFIXES):
            if part in names:
                return stage
    return None


def cross_attention_layers(unet: nn.Module) -> list[CrossAttentionLayer]:
    """All attn2 modules of `unet` (LDM or diffusers names) in CIDM order, with their projection sizes.

    Raises:
        CIDMInputError: ("model") when the UNet has no attn2 module with to_q/to_k/to_v/to_out.
    """
    found = []
    for position, (path, module) in enumerate(unet.named_modules()):
        if not path.endswith("attn2") or not all(hasattr(module, p) for p in ("to_q", "to_k", "to_v", "to_out")):
            continue
        stage = _stage(path)
        if stage is None:
            continue
        found.append((stage, position, path, module))
    # diffusers registers up_blocks before mid_block, so sort by stage and keep forward order inside a stage.
    found.sort(key=lambda item: (item[0], item[1]))
    layers = []
    for index, (_, _, path, module) in enumerate(found):
        layers.append(CrossAttentionLayer(index=index, path=path, query_dim=module.to_q.in_features,
                                          context_dim=module.to_k.in_features, heads=module.heads))
    if not layers:
        raise CIDMInputError("model", "no cross-attention (attn2) layers found; supported: SD1.5- and SDXL-layout "
                                      "UNets")
    return layers


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


# Weights that LoRAs leave alone (input conv, time embedding, output conv): they identify the base model.
FINGERPRINT_KEYS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")


def base_model_fingerprint(unet_tensor: Callable[[str], torch.Tensor], num_layers: int) -> str:
    """A short hash of the base UNet, from `unet_tensor(key)` for the LDM keys above (fp32 values)."""
    return tensor_fingerprint(((key, unet_tensor(key)) for key in FINGERPRINT_KEYS), str(num_layers))


def tensor_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], suffix: str = "") -> str:
    """32 hex digits of sha256 over each (name, fp32 values) in order, then `suffix`."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(suffix.encode())
    return digest.hexdigest()[:32]
