"""The model families (cidm.family): one description per family, and the layer -> token-slot map."""

from dataclasses import replace

import pytest
import torch

from cidm.errors import CIDMInputError
from cidm.family import FAMILIES, SD15, SDXL, family_named
from cidm.tokens import check_token_slots, layers_from_slots, mean_embedding_norm

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


def test_token_slot_checks_and_the_freeze_rule_reads_the_first_tower():
    assert check_token_slots([0, 0, 1, 1, 2], 5) == [0, 0, 1, 1, 2]
    for bad, count in (([0, 2], 2), ([1, 0], 2), ([0, 1], 3), ([0, 0.0], 2)):
        with pytest.raises(CIDMInputError, match="library: token slots"):
            check_token_slots(bad, count)
    encoded = torch.arange(3.0)[:, None]
    assert layers_from_slots(encoded, [0, 0, 1, 2, 1]).flatten().tolist() == [0, 0, 1, 2, 1]
    # an SDXL row [CLIP-L 768 | CLIP-G 1280] started at sigma 0.013: 0.36 on CLIP-L, 0.59 over the whole row
    row = torch.randn(1, 11, SDXL.context_dim, generator=torch.Generator().manual_seed(0)) * 0.013
    assert mean_embedding_norm(row) > 0.55 > 0.4 > mean_embedding_norm(row, SDXL.towers[0].width) > 0.3
