"""cidm.auto_regions: the probe's grid, the attention maps, the scores, the masks and the fallback."""

import pytest
import torch

from cidm.auto_regions import (AttentionProbe, ProbeSettings, auto_masks, concept_attention, contrastive_scores,
                               latent_masks, probe_grid)
from cidm.errors import CIDMInputError
from cidm.routing import LayerwisePrompt, NamedConcept, only_concept
from cidm.tokens import ConceptVocabulary


@pytest.mark.parametrize("latent, downscale, grid", [((64, 64), 4, (16, 16)), ((128, 128), 4, (32, 32)),
                                                     ((60, 92), 4, (15, 23)), ((9, 13), 8, (2, 2)),
                                                     ((16, 32), 1, (16, 32))])
def test_the_probe_grid_halves_the_latent_rounding_up_as_the_unet_does(latent, downscale, grid):
    assert probe_grid(latent, downscale) == grid


def test_probe_steps_are_a_share_of_the_run_never_none_and_never_all():
    settings = ProbeSettings(steps=0.2)
    assert [settings.probe_steps(n) for n in (2, 5, 10, 30)] == [1, 1, 2, 6]
    assert ProbeSettings(steps=0.9).probe_steps(3) == 2
    assert ProbeSettings(steps=0.0).probe_steps(10) == 1


@pytest.mark.parametrize("field, value", [("steps", 1.5), ("threshold", -0.1), ("downscale", 3)])
def test_bad_settings_name_the_input(field, value):
    with pytest.raises(CIDMInputError, match=f"probe_{field}"):
        ProbeSettings(**{field: value})


def test_concept_attention_is_the_softmax_probability_averaged_over_heads_and_a_concepts_tokens():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    maps = concept_attention(q, k, heads=2, positions=[[1], [2, 4]])
    expected = []
    for head in range(2):
        part = slice(4 * head, 4 * head + 4)
        logits = torch.einsum("bnd,btd->bnt", q[..., part], k[..., part]) / 2.0  # √d = 2
        expected.append(logits.softmax(dim=-1))
    probabilities = torch.stack(expected).mean(dim=0)
    assert maps.shape == (2, 2, 6)
    torch.testing.assert_close(maps[:, 0], probabilities[..., 1])
    torch.testing.assert_close(maps[:, 1], probabilities[..., [2, 4]].mean(dim=-1))


def test_the_probe_averages_its_calls_and_ignores_other_grids():
    probe = AttentionProbe([[0], [1]], (2, 3))
    assert probe.maps() is None
    assert probe.wants((2, 3)) and not probe.wants((4, 6))
    q, k = torch.randn(1, 6, 4), torch.randn(1, 3, 4)
    probe.observe(q, k, 1)
    probe.observe(q * 0, k, 1)
    first = concept_attention(q, k, 1, [[0], [1]])
    flat = concept_attention(q * 0, k, 1, [[0], [1]])
    torch.testing.assert_close(probe.maps(), ((first + flat) / 2).reshape(1, 2, 2, 3))


def test_contrastive_scores_subtract_the_other_concepts_and_span_zero_to_one():
    maps = torch.tensor([[[0.5, 0.1], [0.3, 0.1]], [[0.1, 0.4], [0.2, 0.1]]])
    scores = contrastive_scores(maps)
    raw = torch.stack([2 * maps[0] - maps[1], 2 * maps[1] - maps[0]])
    for c in range(2):
        expected = (raw[c] - raw[c].min()) / (raw[c].max() - raw[c].min())
        torch.testing.assert_close(scores[c], expected)


def two_blobs(size=(8, 16), strength=1.0) -> torch.Tensor:
    """Maps of two concepts, one attending to the left half, the other to the right, over a flat floor."""
    maps = torch.full((2, *size), 0.1)
    maps[0, :, : size[1] // 2] += strength
    maps[1, :, size[1] // 2:] += strength
    return maps


def test_two_separate_maps_give_two_disjoint_masks_in_their_places():
    found = auto_masks(two_blobs(), ["<dog>", "<duck>"], ProbeSettings())
    assert found.problem == ""
    assert found.masks.shape == (2, 8, 16)
    assert found.masks[0, :, :8].all() and not found.masks[0, :, 8:].any()
    assert found.masks[1, :, 8:].all() and not found.masks[1, :, :8].any()
    assert (found.masks.sum(dim=0) <= 1).all()


def test_cells_below_the_threshold_stay_with_the_global_prompt():
    maps = two_blobs()
    maps[:, :2] = 0.1  # the top rows: nobody's
    found = auto_masks(maps, ["<dog>", "<duck>"], ProbeSettings(threshold=0.5))
    assert not found.masks[:, :2].any()
    assert found.masks[:, 2:].sum() == 6 * 16


def test_two_concepts_attending_to_the_same_place_fall_back_and_say_so():
    maps = two_blobs()
    maps[1] = maps[0] + 0.01 * torch.rand(8, 16)
    found = auto_masks(maps, ["<dog>", "<duck>"], ProbeSettings())
    assert found.masks is None
    assert "<dog> and <duck> attend to the same places" in found.problem


def test_a_concept_whose_map_collapses_falls_back_and_says_so():
    maps = two_blobs()
    maps[1] = 0.1
    maps[1, 0, 15] = 5.0  # one cell: 1/128 of the grid
    maps[0, 0, 15] = 0.0
    found = auto_masks(maps, ["<dog>", "<duck>"], ProbeSettings(min_area=0.02, max_overlap=1.0))
    assert found.masks is None
    assert "<duck>'s attention collapsed" in found.problem


def test_named_concepts_group_tokens_by_concept_with_their_positions_and_only_concept_keeps_one():
    vocabulary = ConceptVocabulary({"dog": ["<dog1>", "<dog2>"], "duck": ["<duck1>"]},
                                   {t: torch.zeros(1, 4) for t in ("<dog1>", "<dog2>", "<duck1>")})
    text = vocabulary.expand("a <duck> and a <dog> and <dog1> again")
    concepts = vocabulary.named_concepts(text, [3, 7, 8, 11])
    assert concepts == (NamedConcept("duck", ("<duck1>",), (3,)),
                        NamedConcept("dog", ("<dog1>", "<dog2>"), (7, 8, 11)))
    prompt = LayerwisePrompt(torch.zeros(2, 16, 4), tuple(vocabulary.tokens_in(text)), "lib", concepts)
    alone = only_concept(prompt, concepts[1])
    assert alone.tokens == ("<dog1>", "<dog2>") and alone.concepts == (concepts[1],)
    assert alone.contexts is prompt.contexts


def test_grid_masks_reach_the_latent_as_the_unet_lays_the_grid_out():
    """A 17×25 latent has a 5×7 grid at a quarter (rounded up): cell (4, 6) covers latent rows 16 and column 24
    only, not a stretched sixth of the latent."""
    grid = torch.zeros(1, *probe_grid((17, 25), 4))
    grid[0, 4, 6] = 1.0
    (mask,) = latent_masks(grid, 4, (17, 25))
    assert mask.shape == (17, 25)
    assert mask.nonzero().tolist() == [[16, 24]]
    grid[0, 0, 0] = 1.0
    (mask,) = latent_masks(grid, 4, (17, 25))
    assert mask[:4, :4].all() and mask.sum() == 17
