"""The model families (cidm.family): one description per family, and the layer -> token-slot map."""

from dataclasses import replace

import pytest

from cidm.errors import CIDMInputError
from cidm.family import FAMILIES, SD15, SDXL, family_named

SD15_PATHS = [f"input_blocks.{b}.1.transformer_blocks.0.attn2" for b in (1, 2, 4, 5, 7, 8)] + \
    ["middle_block.1.transformer_blocks.0.attn2"] + \
    [f"output_blocks.{b}.1.transformer_blocks.0.attn2" for b in range(3, 12)]
SDXL_STACKS = [("input_blocks.4", 2), ("input_blocks.5", 2), ("input_blocks.7", 10), ("input_blocks.8", 10),
               ("middle_block", 10), ("output_blocks.0", 10), ("output_blocks.1", 10), ("output_blocks.2", 10),
               ("output_blocks.3", 2), ("output_blocks.4", 2), ("output_blocks.5", 2)]
SDXL_PATHS = [f"{stack}.1.transformer_blocks.{i}.attn2" for stack, depth in SDXL_STACKS for i in range(depth)]


def test_each_family_holds_its_published_numbers():
    assert (SD15.context_dim, SD15.pooled_width, SD15.adm_channels, SD15.resolution) == (768, 0, 0, 512)
    assert (SDXL.context_dim, SDXL.pooled_width, SDXL.adm_channels, SDXL.resolution) == (2048, 1280, 2816, 1024)
    assert [t.key for t in SDXL.towers] == ["l", "g"] and not SDXL.towers[1].pads_with_end
    assert SDXL.adm_channels == SDXL.pooled_width + 6 * 256  # comfy/model_base.py SDXL.encode_adm
    assert [family_named(f.name) for f in FAMILIES] == list(FAMILIES)
    with pytest.raises(CIDMInputError, match="library: unknown model family 'SD3'; known: SD1.5, SDXL"):
        family_named("SD3")


def test_token_slots_one_per_layer_or_one_per_transformer_stack():
    assert len(SDXL_PATHS) == 70
    assert SD15.token_slots(SD15_PATHS) == list(range(16))
    shared_sd15 = replace(SD15, shared_slots=True)
    assert shared_sd15.token_slots(SD15_PATHS) == list(range(16)), "SD1.5's stacks hold one layer each"
    assert SDXL.token_slots(SDXL_PATHS, shared=False) == list(range(70))
    shared = SDXL.token_slots(SDXL_PATHS)  # SDXL's default: one slot per transformer stack
    assert shared == SDXL.token_slots(SDXL_PATHS, shared=True)
    assert max(shared) == 10 and shared[:4] == [0, 0, 1, 1] and shared[-2:] == [10, 10]
    assert [shared.count(s) for s in range(11)] == [depth for _, depth in SDXL_STACKS]
    with pytest.raises(CIDMInputError, match="model"):
        SDXL.token_slots([])
