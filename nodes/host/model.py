"""Model identity: the UNet of a ComfyUI MODEL, its cross-attention layers, and the base-model fingerprint that a
concept library is bound to."""

from __future__ import annotations

import torch

from ...cidm.errors import CIDMInputError
from ...cidm.layers import CrossAttentionLayer, base_model_fingerprint, cross_attention_layers, get_submodule

UNET_PREFIX = "diffusion_model."


def unet_of(model) -> torch.nn.Module:
    return model.model.diffusion_model


def model_layers(model) -> list[CrossAttentionLayer]:
    if getattr(model.model, "latent_format", None) is None or not hasattr(model.model, "diffusion_model"):
        raise CIDMInputError("model", "not a UNet diffusion model; supported: SD1.5-layout checkpoints")
    layers = cross_attention_layers(unet_of(model))
    context_dims = {layer.context_dim for layer in layers}
    if context_dims != {768}:
        raise CIDMInputError("model", f"cross-attention context size {sorted(context_dims)} is not SD1.5's 768; "
                                      "supported: SD1.5-layout checkpoints (SD1.x and fine-tunes of it)")
    return layers


def model_fingerprint(model) -> str:
    unet = unet_of(model)
    return base_model_fingerprint(lambda key: get_submodule(unet, key.rsplit(".", 1)[0]).weight,
                                  len(cross_attention_layers(unet)))


def base_model_info(model) -> dict:
    layers = model_layers(model)
    return {"fingerprint": model_fingerprint(model), "num_layers": len(layers), "context_dim": 768,
            "layer_paths": [layer.path for layer in layers], "model_type": type(model.model).__name__}
