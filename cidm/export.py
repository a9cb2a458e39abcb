"""Export of one task as a standard LoRA file that ComfyUI's LoraLoader and diffusers' `load_lora_weights` read.

Keys use kohya-ss sd-scripts' names, `lora_unet_<UNet module path with "." as "_">` with `.lora_down.weight`,
`.lora_up.weight` and `.alpha`, on the module paths sd-scripts itself uses for the family (`ModelFamily.lora_paths`):
- SD1.x (`"diffusers"`): sd-scripts trains on the diffusers UNet, so the diffusers module path, e.g.
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q`. The LDM names a ComfyUI library stores
  (`input_blocks.1.1.…`) load in ComfyUI only: diffusers' SD1.x loader turns `lora_unet_input_blocks_1_1_…` into
  `down_blocks.1.1.…`, a module that does not exist.
- SDXL (`"ldm"`): sd-scripts' `sdxl_original_unet.py` keeps the LDM names, so the library's own path, e.g.
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q`. The names need no block arithmetic here: each
  loader maps them by its own model's structure, which also holds for SDXL-layout models with other block counts
  (SSD-1B, Vega, KOALA).
Both hosts read the names of either family:
- ComfyUI (v0.3.75, `comfy/lora.py:175-201` `model_lora_keys_unet`) maps every `lora_unet_<LDM path>` of the model
  directly and every `lora_unet_<diffusers path>` through `comfy.utils.unet_to_diffusers` of the model's own config;
- diffusers (v0.42.1, `loaders/lora_conversion_utils.py:261` `_convert_unet_lora_key`) turns `_` back into module
  paths; its SDXL loader (`loaders/lora_pipeline.py:597-631` `StableDiffusionXLLoraLoaderMixin.load_lora_weights`)
  first maps LDM block names onto its UNet by `unet.config.layers_per_block` (`lora_pipeline.py:768-770`,
  `lora_conversion_utils.py:31` `_maybe_map_sgm_blocks_to_diffusers`), then calls `load_lora_into_unet`.

Loaders scale by alpha/rank, so alpha is written as rank·multiplier to reproduce h = Wx + m·BAx.
What the format cannot carry: the layer-wise concept token embeddings (one per token slot, cidm.tokens). A stock
LoRA applies to every prompt, so the concept is invoked by the class word, not by its tokens.

An export never replaces a file the pack did not write for the same task: `write_export` recognises its own file by
the safetensors metadata it writes (`cidm.format` "cidm-exported-lora", the library name, and the task file's sha256
from the manifest, which changes whenever the task does), and refuses every other existing file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .adapters import TaskFactors
from .errors import CIDMInputError
from .family import SD15, ModelFamily
from .files import write_atomic
from .library import TaskRecord

EXPORT_NOTE = ("layer-wise concept tokens are not part of the standard LoRA format; this file holds only the "
               "cross-attention LoRA and applies to every prompt")

EXPORT_FORMAT = "cidm-exported-lora"

# SD1.x UNet: each level holds 2 attention blocks, then a downsample (input side) or 3 (output side).
_INPUT_BLOCKS_PER_LEVEL, _INPUT_ATTENTIONS, _OUTPUT_BLOCKS_PER_LEVEL = 3, 2, 3
_LDM_ATTENTION = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.1\.(.+)|middle_block\.1\.(.+)")
_DIFFUSERS_ATTENTION = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\..+")


def diffusers_unet_path(path: str) -> str:
    """The diffusers module path of an SD1.x UNet attention submodule named by its LDM path (ComfyUI's names).

    input_blocks.{3i+j+1}.1.X → down_blocks.i.attentions.j.X (j < 2), middle_block.1.X → mid_block.attentions.0.X,
    output_blocks.{3i+j}.1.X → up_blocks.i.attentions.j.X (the block layout of ComfyUI v0.3.75
    `comfy.utils.unet_to_diffusers` for SD1.x's two residual blocks per level; a one-level UNet, like the mini
    test checkpoint, maps the same way). A path already in diffusers form (libraries trained with the diffusers
    backend) comes back unchanged.

    Raises:
        CIDMInputError: ("library") when `path` is not an attention submodule of an SD1.x UNet in either form.
    """
    if _DIFFUSERS_ATTENTION.fullmatch(path):
        return path
    match = _LDM_ATTENTION.fullmatch(path)
    if match is None:
        raise CIDMInputError("library", f"layer {path!r} is not an SD1.x UNet attention module")
    stage, block, rest, middle_rest = match.groups()
    if middle_rest is not None:
        return f"mid_block.attentions.0.{middle_rest}"
    block = int(block)
    if stage == "output_blocks":
        level, position = divmod(block, _OUTPUT_BLOCKS_PER_LEVEL)
        return f"up_blocks.{level}.attentions.{position}.{rest}"
    level, position = divmod(block - 1, _INPUT_BLOCKS_PER_LEVEL)
    if block < 1 or position >= _INPUT_ATTENTIONS:
        raise CIDMInputError("library", f"layer {path!r} is a downsample block in SD1.x, not an attention module")
    return f"down_blocks.{level}.attentions.{position}.{rest}"


def lora_unet_path(path: str, family: ModelFamily) -> str:
    """The module path an exported LoRA of `family` names for the UNet attention submodule at `path` (a library's
    layer path, LDM or diffusers form): `diffusers_unet_path(path)` for `lora_paths` "diffusers", `path` itself
    for "ldm" (module docstring).

    Raises:
        CIDMInputError: ("library") when `path` is not a UNet attention submodule in a form the family's names
            come from: for "ldm", an LDM path (`input_blocks.N.1.…`, `middle_block.1.…`, `output_blocks.N.1.…`).
    """
    if family.lora_paths == "diffusers":
        return diffusers_unet_path(path)
    if not _LDM_ATTENTION.fullmatch(path):
        raise CIDMInputError("library", f"layer {path!r} is not an {family.name} UNet attention module in LDM form "
                                        "(input_blocks.N.1..., middle_block.1..., output_blocks.N.1...)")
    return path


def standard_lora_state_dict(lora: TaskFactors, layer_paths: list[str], multiplier: float,
                             family: ModelFamily = SD15, dtype: torch.dtype = torch.float16
                             ) -> dict[str, torch.Tensor]:
    """One task's factors as a kohya-named LoRA state dict of `family` (see the module docstring).

    `lora` maps (layer index, projection) to (down [r, in], up [out, r]); `layer_paths[layer]` is that layer's
    attn2 path from the UNet root, in LDM or diffusers form; `family` is the library's (`ConceptLibrary.family`,
    SD1.5 for libraries that record none). Factors are stored as `dtype` (fp16, as most LoRA files are); `.alpha`
    is the fp32 scalar rank·multiplier.

    Raises:
        CIDMInputError: ("library") as `lora_unet_path`, for a layer path the family's names cannot come from.
    """
    state = {}
    for (layer, proj), (down, up) in sorted(lora.items()):
        name = "lora_unet_" + f"{lora_unet_path(layer_paths[layer], family)}.{proj}".replace(".", "_")
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]) * multiplier)
    return state


def export_metadata(library: str, task: TaskRecord) -> dict[str, str]:
    """The safetensors metadata of `task`'s export from `library`: what identifies the file as the pack's own."""
    return {"cidm.format": EXPORT_FORMAT, "cidm.library": library, "cidm.concept": task.concept,
            "cidm.task": str(task.index), "cidm.task_sha256": task.sha256, "cidm.note": EXPORT_NOTE}


def _owner(path: Path) -> dict[str, str]:
    """The metadata of the pack's export at `path`; empty when it is not one (or not a safetensors file)."""
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
    except Exception:  # anything unreadable is the user's file
        return {}
    return metadata if metadata.get("cidm.format") == EXPORT_FORMAT else {}


def _described(owner: dict[str, str], library: str, concept: str) -> str:
    if not owner:
        return "not a LoRA this pack exported"
    if (owner.get("cidm.library"), owner.get("cidm.concept")) == (library, concept):
        return f"this pack's export of another version of '{concept}', from a library '{library}' trained before"
    return f"this pack's export of '{owner.get('cidm.concept')}' from library '{owner.get('cidm.library')}'"


def write_export(path: Path, state: dict[str, torch.Tensor], library: str, task: TaskRecord) -> bool:
    """Write `state` (from `standard_lora_state_dict`) to `path` as the export of `task` from `library`, atomically
    and with the folder's normal permissions (`cidm.files.write_atomic`). Returns True when it replaced the pack's
    earlier export of this same task (same library and concept, same task sha256), False when `path` was free.

    Raises:
        CIDMInputError: ("filename") naming the existing file and what to do, when anything else is at `path`
            (a user's file, or an export of another task or library); or naming `path` when the OS refuses the
            write.
    """
    path = Path(path)
    exists = os.path.lexists(path)
    owner = _owner(path) if exists else {}
    identity = [owner.get(key) for key in ("cidm.library", "cidm.concept", "cidm.task_sha256")]
    if exists and identity != [library, task.concept, task.sha256]:
        raise CIDMInputError("filename", f"{path} already exists ({_described(owner, library, task.concept)}); "
                                         "it is never overwritten. Set filename to a new name, or move or delete "
                                         "that file, then run again")
    write_atomic(path, safetensors_bytes(state, metadata=export_metadata(library, task)), "filename")
    return exists
