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


def check_trainable(model) -> None:
    """Refuses, before any work, a MODEL whose UNet the pack cannot train: training denoises the VAE's latents
    with text conditioning only, so the UNet must take and predict exactly the latent channels and need no class
    or image-embedding input. Inpainting (latent + mask + masked image: 2C+1 input channels), image-conditioned
    (e.g. InstructPix2Pix: 2C), depth (C+1) and learned-variance (2C output) UNets, and unCLIP-style class inputs,
    are refused with the reason.

    Raises:
        CIDMInputError: ("model") naming the layout found and the one the pack trains.
    """
    unet, channels = unet_of(model), model.model.latent_format.latent_channels
    inputs, outputs = getattr(unet, "in_channels", channels), getattr(unet, "out_channels", channels)
    kinds = {2 * channels + 1: "an inpainting UNet: it also takes a mask and the masked image",
             2 * channels: "an image-conditioned UNet (like InstructPix2Pix): it also takes a source image",
             channels + 1: "a depth-conditioned UNet: it also takes a depth map"}
    supported = (f"the pack trains text-to-image UNets whose input and output are the {channels}-channel latent; "
                 "train on the plain SD1.5 checkpoint this model was made from")
    if inputs != channels:
        kind = kinds.get(inputs, "not a plain text-to-image UNet")
        raise CIDMInputError("model", f"this UNet takes {inputs} input channels ({kind}); {supported}")
    if outputs != channels:
        raise CIDMInputError("model", f"this UNet predicts {outputs} channels, not the {channels} of its latent "
                                      f"(e.g. a learned-variance UNet); {supported}")
    if getattr(unet, "num_classes", None) is not None:
        raise CIDMInputError("model", f"this UNet needs a class or image-embedding input ({unet.num_classes!r}, "
                                      f"as unCLIP models do); {supported}")


def weights_fixed_for_run(model) -> bool:
    """False when ComfyUI weight hooks are registered on the MODEL for this sampling run: their keyframes re-patch
    weights in place between steps (comfy/model_patcher.py:patch_hooks, v0.3.75), so nothing computed from the
    weights may be cached for the run (cidm.routing.RunCache.static_weights)."""
    return not model.hook_patches


def model_fingerprint(model) -> str:
    unet = unet_of(model)
    return base_model_fingerprint(lambda key: get_submodule(unet, key.rsplit(".", 1)[0]).weight,
                                  len(cross_attention_layers(unet)))


def base_model_info(model) -> dict:
    layers = model_layers(model)
    return {"fingerprint": model_fingerprint(model), "num_layers": len(layers), "context_dim": 768,
            "layer_paths": [layer.path for layer in layers], "model_type": type(model.model).__name__}
