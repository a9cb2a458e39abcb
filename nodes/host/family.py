"""Which model family (cidm.family) a ComfyUI MODEL or CLIP belongs to: the one place the pack detects it."""

from __future__ import annotations

from ...cidm.errors import CIDMInputError
from ...cidm.family import FAMILIES, SUPPORTED, ModelFamily, supported_names


def _comfy_names(model) -> list[str]:
    """ComfyUI's model-config class of a MODEL and its bases (comfy/supported_models.py, v0.3.75), most specific
    first: ["SD15"], ["SSD1B", "SDXL"], ["SD3"], ...; [] for an object without one."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return [] if config is None else [cls.__name__ for cls in type(config).__mro__[:-1]
                                      if cls.__name__ not in ("BASE", "object")]


def model_family(model, input_name: str = "model") -> ModelFamily:
    """The family of a MODEL, from the config class ComfyUI detected it as.

    Raises:
        CIDMInputError: (`input_name`) naming what the model is and the supported families, for a model of no
            family the pack describes (SD2, SD3, Flux, video models, ...) or of one it does not run yet.
    """
    names = _comfy_names(model)
    family = next((f for f in FAMILIES if set(f.comfy_names) & set(names)), None)
    what = names[0] if names else type(getattr(model, "model", model)).__name__
    width = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", {}).get("context_dim")
    if width is not None:
        what += f", cross-attention context {width}"
    if family is None:
        raise CIDMInputError(input_name, f"an unsupported model ({what}); supported model families: "
                                         f"{supported_names()}")
    if family not in SUPPORTED:
        raise CIDMInputError(input_name, f"a {family.name}-family model ({what}), which the pack does not run yet; "
                                         f"supported model families: {supported_names()}")
    return family


def clip_family(clip, input_name: str = "clip") -> ModelFamily:
    """The family of a CLIP, from its tokenizer's token-list keys ({"l"}: SD1.5's CLIP-L; {"g", "l"}: SDXL's two
    towers, comfy/sdxl_clip.py:24-33).

    Raises:
        CIDMInputError: (`input_name`) for a text encoder of no supported family.
    """
    keys = set(clip.tokenize(""))
    family = next((f for f in FAMILIES if {tower.key for tower in f.towers} == keys), None)
    if family is None or family not in SUPPORTED:
        what = f"{family.name}-family" if family is not None else f"unsupported ({', '.join(sorted(keys))})"
        raise CIDMInputError(input_name, f"{what} text encoder; supported model families: {supported_names()}")
    return family
