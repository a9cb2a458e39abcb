"""Model identity: the UNet of a ComfyUI MODEL, its cross-attention layers, and the base-model fingerprint that a
concept library is bound to."""

from __future__ import annotations

import torch

from ...cidm.errors import CIDMInputError
from ...cidm.family import supported_names
from ...cidm.layers import CrossAttentionLayer, base_model_fingerprint, cross_attention_layers, get_submodule
from .family import model_family

UNET_PREFIX = "diffusion_model."
# model_options key: sha256 of every library task the MODEL applies -> which task and node (`mark_applied`).
APPLIED_TASKS_KEY = "cidm_applied_tasks"


def unet_of(model) -> torch.nn.Module:
    return model.model.diffusion_model


def model_layers(model) -> list[CrossAttentionLayer]:
    """The MODEL's cross-attention layers in CIDM order (cidm.layers), for a model of a supported family.

    Raises:
        CIDMInputError: ("model") for a model that is not a UNet diffusion model, of no supported family
            (`model_family`), or whose cross-attention context is not its family's width.
    """
    if getattr(model.model, "latent_format", None) is None or not hasattr(model.model, "diffusion_model"):
        raise CIDMInputError("model", f"not a UNet diffusion model; supported model families: {supported_names()}")
    family = model_family(model)
    layers = cross_attention_layers(unet_of(model))
    context_dims = {layer.context_dim for layer in layers}
    if context_dims != {family.context_dim}:
        raise CIDMInputError("model", f"cross-attention context size {sorted(context_dims)} is not {family.name}'s "
                                      f"{family.context_dim}; supported model families: {supported_names()}")
    return layers


def check_trainable(model) -> None:
    """Refuses, before any work, a MODEL whose UNet the pack cannot train: training denoises the VAE's latents
    with text conditioning only, so the UNet must take and predict exactly the latent channels and need no class
    or image-embedding input beyond its family's ADM input (SDXL's pooled text and sizes: `num_classes`
    "sequential" with the model's `adm_channels` equal to the family's, comfy/model_detection.py:629-633 and
    comfy/model_base.py:149-151, v0.3.75). Inpainting (latent + mask + masked image: 2C+1 input channels),
    image-conditioned (e.g. InstructPix2Pix: 2C), depth (C+1) and learned-variance (2C output) UNets, and
    unCLIP-style class inputs, are refused with the reason.

    Raises:
        CIDMInputError: ("model") naming the layout found and the one the pack trains, or for a model of no
            supported family (`model_family`).
    """
    family = model_family(model)
    unet, channels = unet_of(model), model.model.latent_format.latent_channels
    inputs, outputs = getattr(unet, "in_channels", channels), getattr(unet, "out_channels", channels)
    kinds = {2 * channels + 1: "an inpainting UNet: it also takes a mask and the masked image",
             2 * channels: "an image-conditioned UNet (like InstructPix2Pix): it also takes a source image",
             channels + 1: "a depth-conditioned UNet: it also takes a depth map"}
    supported = (f"the pack trains text-to-image UNets whose input and output are the {channels}-channel latent; "
                 f"train on the plain {family.name} checkpoint this model was made from")
    if inputs != channels:
        kind = kinds.get(inputs, "not a plain text-to-image UNet")
        raise CIDMInputError("model", f"this UNet takes {inputs} input channels ({kind}); {supported}")
    if outputs != channels:
        raise CIDMInputError("model", f"this UNet predicts {outputs} channels, not the {channels} of its latent "
                                      f"(e.g. a learned-variance UNet); {supported}")
    classes = getattr(unet, "num_classes", None)
    family_adm = family.adm_channels and classes == "sequential" and model.model.adm_channels == family.adm_channels
    if classes is not None and not family_adm:
        raise CIDMInputError("model", f"this UNet needs a class or image-embedding input ({classes!r}, "
                                      f"as unCLIP models do); {supported}")


def check_unpatched(model) -> None:
    """Refuses, before any work, a MODEL whose UNet other nodes have changed: a task is learned on the model it is
    given but applied on whatever model carries the library's base model, so it must learn the plain base model.
    Refused: weight patches (a LoRA from LoraLoader, LoraLoaderModelOnly or Load Concept as LoRA, a model merge),
    weight wrappers, and replaced UNet modules (the concepts of Elastic Aggregate LoRAs, other nodes' object patches
    under the UNet), which training would learn into the task or silently drop. The library's own tasks are
    consolidated by training itself. Sampling-time settings (model_sampling, attention and block patches,
    CFG functions) change no weights and pass.

    Raises:
        CIDMInputError: ("model") naming what is applied and what to train on instead.
    """
    found = []
    if model.model_options.get(APPLIED_TASKS_KEY):
        found.append("CIDM concepts (" + "; ".join(model.model_options[APPLIED_TASKS_KEY].values()) + ")")
    if model.patches:
        found.append(f"weight patches on {len(model.patches)} weights (a LoRA or a model merge)")
    if getattr(model, "weight_wrapper_patches", None):
        found.append(f"weight wrappers on {len(model.weight_wrapper_patches)} weights")
    replaced = sorted(key for key in model.object_patches if key.startswith(UNET_PREFIX))
    if replaced:
        found.append(f"{len(replaced)} replaced UNet modules (e.g. {replaced[0]})")
    if found:
        raise CIDMInputError("model", "this model carries " + " and ".join(found) + "; a task learns the model it is "
                                      "trained on but is applied on the plain base model. Train on the model "
                                      "straight from the checkpoint loader (the library's tasks are consolidated "
                                      "by training itself); apply LoRAs and concepts after training, for sampling")


def check_library_model(library, model) -> None:
    """Refuses a MODEL other than the base model `library` (a cidm ConceptLibrary) was trained on: what Elastic
    Aggregate LoRAs and Load Concept as LoRA check before they patch it.

    Raises:
        CIDMInputError: ("model") for a model the pack does not support (`model_layers`) or another base model
            (ConceptLibrary.check_base_model, naming both fingerprints).
    """
    info = base_model_info(model)
    library.check_base_model(info["fingerprint"], info["num_layers"], info["family"])


def check_not_applied(model, tasks, input_name: str) -> None:
    """Refuses library tasks (cidm TaskRecords) that an earlier node of the MODEL's chain already applies (Elastic
    Aggregate LoRAs or Load Concept as LoRA, of the same library or a copy: a task is known by its file's sha256),
    since applying a task again adds its LoRA a second time.

    Raises:
        CIDMInputError: (`input_name`) naming each such task and the node that applied it.
    """
    applied = model.model_options.get(APPLIED_TASKS_KEY, {})
    twice = [f"'{task.concept}' ({applied[task.sha256]})" for task in tasks if task.sha256 in applied]
    if twice:
        raise CIDMInputError(input_name, f"{', '.join(twice)} already on this model; a concept applied twice gets "
                                         "its LoRA twice. Apply each concept once on a model chain: chain a library "
                                         "once, or pick other tasks")


def mark_applied(patched, library_name: str, tasks, node: str) -> None:
    """Records on `patched` (the node's clone of the MODEL) that it now applies `tasks` of the library, for
    check_not_applied and check_unpatched further down the chain."""
    applied = patched.model_options.setdefault(APPLIED_TASKS_KEY, {})
    applied.update({task.sha256: f"task {task.index} of library '{library_name}', applied by {node}"
                    for task in tasks})


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
    """What a library records of its base model (cidm ConceptLibrary.base_model): fingerprint, family, layer count
    and paths, context width and ComfyUI's model class.

    Raises:
        CIDMInputError: ("model") as `model_layers`.
    """
    layers = model_layers(model)
    return {"fingerprint": model_fingerprint(model), "family": model_family(model).name, "num_layers": len(layers),
            "context_dim": layers[0].context_dim, "layer_paths": [layer.path for layer in layers],
            "model_type": type(model.model).__name__}
