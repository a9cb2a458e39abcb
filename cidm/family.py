"""The model families the pack knows, each described once, as data: the only place a family's numbers live.

A `ModelFamily` holds what the method needs to know of a family and cannot read from one model: the text
encoders (towers) and their token widths, the tokens per prompt chunk, the extra UNet conditioning (pooled text and
ADM), the latent scale, the default resolution, and how cross-attention layers share concept-token slots. What a
model shows for itself (its attn2 layers, their sizes and count) is read from it (`cidm.layers`), never assumed.

Detection of a host's MODEL and CLIP lives in one place per host (ComfyUI: `nodes/host/family.py`); adding a family
is one new `ModelFamily` here, listed in `FAMILIES`, plus its tests.

Sources: ComfyUI v0.3.75 (`comfy/supported_models.py` SD15 and SDXL; `comfy/sd1_clip.py`, `comfy/sdxl_clip.py`;
`comfy/latent_formats.py` SD15 and SDXL; `comfy/model_base.py` SDXL.encode_adm), summarised with line numbers in
the pack's `shared/reference/sdxl-facts.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CIDMInputError


@dataclass(frozen=True)
class TextTower:
    """One text encoder of a family: ComfyUI's key for its token lists ("l" for CLIP-L, "g" for CLIP-G), the width
    of its token embeddings and hidden states, and whether its tokenizer pads with the end token (CLIP-L) or with 0
    (CLIP-G: `pad_with_end=False`, comfy/sdxl_clip.py:14-21)."""

    key: str
    width: int
    pads_with_end: bool = True


@dataclass(frozen=True)
class ModelFamily:
    """What the pack knows of one model family (module docstring).

    name: the family's name in messages and in a library's `base_model["family"]`.
    comfy_names: ComfyUI's `supported_models` classes of this family; their subclasses belong to it too (SDXL's:
        SSD1B, Segmind_Vega, KOALA_700M, KOALA_1B), and fine-tunes detect as their base.
    towers: the text encoders, in the order ComfyUI joins their hidden states along the features axis
        (SDXL: [CLIP-L 768 | CLIP-G 1280] = 2048, comfy/sdxl_clip.py:56-62); a concept token's embedding for one
        slot is the towers' embeddings joined in the same order ([n, S, Σ widths] in a task file).
    tokens_per_chunk: tokens of one prompt chunk (start, 75 text tokens, end and padding).
    pooled_width: width of the pooled text output the UNet takes through its ADM input (0: none, as SD1.5).
    adm_channels: width of the UNet's `y` input (0: none); SDXL's is pooled 1280 + 6 size embeddings of 256.
    latent_scale: the VAE latent scale factor.
    resolution: the default training and sampling resolution, in pixels (the family's native size).
    lora_paths: the UNet module paths an exported LoRA's kohya names are built on (`cidm.export`), those kohya-ss
        sd-scripts uses for the family: "diffusers" (SD1.x: `lora_unet_down_blocks_0_attentions_0_…`) or "ldm"
        (SDXL, sd-scripts' `sdxl_original_unet.py`: `lora_unet_input_blocks_4_1_…`).
    shared_slots: whether the attn2 layers of one transformer stack share one token slot (`token_slots`); on SD1.5
        every stack has one layer, so both rules give one slot per layer.
    vae_downscale: image pixels per latent cell along each side (SD1.5's and SDXL's VAEs: 8; ComfyUI's
        `comfy/sd.py` VAE.downscale_ratio).
    pooled_projected: whether the CLIP's pooled output is projected into CLIP's joint image-text space, so that a
        CLIP vision model of the same width can score text alignment against it (SDXL's CLIP-G:
        `return_projected_pooled=True`, comfy/sdxl_clip.py:14; SD1.5's is not, comfy/sd1_clip.py:676-678).
    """

    name: str
    comfy_names: tuple[str, ...]
    towers: tuple[TextTower, ...]
    tokens_per_chunk: int
    pooled_width: int
    adm_channels: int
    latent_scale: float
    resolution: int
    lora_paths: str
    shared_slots: bool = False
    vae_downscale: int = 8
    pooled_projected: bool = False

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context: the towers' widths joined."""
        return sum(tower.width for tower in self.towers)

    def token_slots(self, layer_paths: list[str], shared: bool | None = None) -> list[int]:
        """The token slot of each cross-attention layer, given the layers' module paths in CIDM order
        (`cidm.layers.cross_attention_layers`): one slot per layer, or, when `shared` (None: the family's
        `shared_slots`), one per transformer stack (the layers under one `…transformer_blocks` module: 11 stacks of
        SDXL's 70 layers). Slots are numbered in order of first use, so the identity map for one slot per layer.

        Raises:
            CIDMInputError: ("model") for an empty layer list.
        """
        if not layer_paths:
            raise CIDMInputError("model", f"no cross-attention layers to map to {self.name} token slots")
        shared = self.shared_slots if shared is None else shared
        keys = [path.rsplit(".transformer_blocks.", 1)[0] if shared else path for path in layer_paths]
        numbers: dict[str, int] = {}
        return [numbers.setdefault(key, len(numbers)) for key in keys]


CLIP_L = TextTower("l", 768)
CLIP_G = TextTower("g", 1280, pads_with_end=False)

# SD1.x and its fine-tunes: comfy/supported_models.py SD15 (context 768, no ADM); latent scale
# comfy/latent_formats.py SD15 (0.18215); 512 px, the released CIDM SD1.5 configs (JiahuaDong/CIFC@9819aa8
# options/train/*.yml).
SD15 = ModelFamily(name="SD1.5", comfy_names=("SD15",), towers=(CLIP_L,), tokens_per_chunk=77, pooled_width=0,
                   adm_channels=0, latent_scale=0.18215, resolution=512, lora_paths="diffusers")

# SDXL and its fine-tunes (Pony, Illustrious, NoobAI, v-prediction ones too): comfy/supported_models.py SDXL and
# the SDXL-layout subclasses (context 2048, adm 2816); pooled CLIP-G 1280 (comfy/sdxl_clip.py); latent scale
# comfy/latent_formats.py SDXL (0.13025); 1024 px native.
# One token slot per transformer stack (11 of 70 layers): a training step encodes the prompt once per slot through
# both towers, and 70 slots made the token encode 14.6 of an 18.6 s step (benchmarks/results/sdxl-cpu.md).
SDXL = ModelFamily(name="SDXL", comfy_names=("SDXL",), towers=(CLIP_L, CLIP_G), tokens_per_chunk=77,
                   pooled_width=1280, adm_channels=2816, latent_scale=0.13025, resolution=1024, lora_paths="ldm",
                   shared_slots=True, pooled_projected=True)

# The token-slot rules a user may choose for a new library (Concept Training Options `token_slots`): the value is
# `token_slots`'s `shared` argument, None for the family's own rule.
TOKEN_SLOT_RULES = {"family default": None, "per layer": False, "per transformer stack": True}

FAMILIES = (SD15, SDXL)
# The families the pipeline runs on; a described family left out gets a message naming what it is.
SUPPORTED = FAMILIES


def family_named(name: str) -> ModelFamily:
    """The family called `name` (a library's `base_model["family"]`).

    Raises:
        CIDMInputError: ("library") for a name no family has.
    """
    for family in FAMILIES:
        if family.name == name:
            return family
    raise CIDMInputError("library", f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def supported_names() -> str:
    """The supported families, for messages: "SD1.5, SDXL"."""
    return ", ".join(family.name for family in SUPPORTED)
