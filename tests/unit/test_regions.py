"""Region masks and region noise estimation against hand computations."""

import pytest
import torch

from cidm.errors import CIDMInputError
from cidm.plots import region_layout
from cidm.regions import blend_region_predictions, box_fractions, box_mask, crop_box, make_regions, mask_at, \
    region_weights, split_masks


def test_box_mask_covers_the_box():
    mask = box_mask(0.5, 0.0, 0.5, 1.0, size=(4, 4))
    assert mask.tolist() == [[0, 0, 1, 1]] * 4


def test_box_mask_gives_partly_covered_cells_their_share():
    mask = box_mask(0.25, 0.0, 0.5, 1.0, size=(1, 2))  # each of the two cells is half covered
    assert mask.tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize("args, input_name", [((0, 0, 0, 1), "width"), ((0, 0, 1, 0), "height"),
                                              ((1.5, 0, 0.5, 1), "x"), ((0, -0.1, 0.5, 1), "y"),
                                              ((0.6, 0, 0.5, 1), "width"), ((0, 0.5, 1, 0.7), "height"),
                                              ((float("nan"), 0, 0.5, 1), "x"), ((0, 0, float("inf"), 1), "width")])
def test_bad_boxes_name_the_input(args, input_name):
    with pytest.raises(CIDMInputError) as error:
        box_fractions(*args)
    assert error.value.input_name == input_name


def test_pixel_boxes_are_read_against_the_canvas():
    assert box_fractions(128, 0, 256, 384, "pixels", 512, 768) == (0.25, 0.0, 0.5, 0.5)
    with pytest.raises(CIDMInputError) as error:
        box_fractions(400, 0, 200, 100, "pixels", 512, 512)
    assert error.value.input_name == "width" and "outside" in str(error.value)
    with pytest.raises(CIDMInputError) as error:
        box_fractions(0, 0, 0, 0, "pixels", 512, 512)
    assert error.value.input_name == "width" and "empty" in str(error.value)


def test_mask_at_is_an_exact_area_average():
    mask = torch.zeros(8, 8)
    mask[0, 0] = 1.0  # one pixel of 16 in the top-left output cell of a 2×2 grid
    assert mask_at(mask, 2, 2).tolist() == [[1 / 16, 0], [0, 0]]
    thin = torch.zeros(64, 64)
    thin[:, 10] = 1.0  # a one-pixel line keeps its mass at 8×8 (bilinear resampling drops it)
    assert mask_at(thin, 8, 8).sum().item() == pytest.approx(thin.sum().item() / 64)
    odd = torch.rand(7, 5)  # non-integer ratios, up and down, keep the mean
    assert mask_at(odd, 3, 11).mean().item() == pytest.approx(odd.mean().item(), rel=1e-5)


def test_overlaps_are_normalised_and_the_rest_is_global():
    left, right = box_mask(0, 0, 0.75, 1, (1, 4)), box_mask(0.25, 0, 0.75, 1, (1, 4))
    weights = region_weights([left, right], 1, 4)
    assert weights[0, 0].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert weights[1, 0].tolist() == [0.0, 0.5, 0.5, 1.0]
    soft = region_weights([torch.full((4, 4), 0.25)], 2, 2)
    assert soft.tolist() == [[[0.25, 0.25], [0.25, 0.25]]]  # a soft mask below 1 leaves the rest to the global prompt


def test_mask_batches_split_into_regions_and_bad_masks_name_the_input():
    batch = torch.zeros(3, 8, 8)
    batch[0, :4], batch[1, 4:], batch[2, :, :2] = 1, 1, 1
    assert [m.sum().item() for m in split_masks(batch)] == [32, 32, 16]
    with pytest.raises(CIDMInputError, match=r"mask 3 of the batch of 3"):
        split_masks(batch * torch.tensor([1.0, 1.0, 0.0])[:, None, None])
    assert len(split_masks(torch.ones(8, 8))) == 1
    nan = batch.clone()
    nan[1, 0, 0] = float("nan")
    empty = batch.clone()
    empty[2] = 0
    for bad, words in ((nan, "NaN"), (empty, "empty")):
        with pytest.raises(CIDMInputError) as error:
            split_masks(bad)
        assert error.value.input_name == "mask" and words in str(error.value)
    with pytest.raises(CIDMInputError, match="empty"):
        split_masks(torch.zeros(8, 8))


@pytest.mark.parametrize("inputs, input_name", [(dict(strength=float("nan")), "strength"),
                                                 (dict(strength=1.5), "strength"),
                                                 (dict(y=float("-inf")), "y")])
def test_non_finite_region_inputs_name_the_input(inputs, input_name):
    arguments = {**dict(x=0.0, y=0.0, width=0.5, height=1.0, strength=1.0), **inputs}
    with pytest.raises(CIDMInputError) as error:
        make_regions(None, "", **arguments)
    assert error.value.input_name == input_name


def test_blend_matches_hand_computation():
    glob = torch.full((1, 1, 1, 3), 10.0)
    first, second = torch.full((1, 1, 1, 3), 2.0), torch.full((1, 1, 1, 3), 4.0)
    left = torch.tensor([[1.0, 1.0, 0.0]])
    right = torch.tensor([[0.0, 1.0, 0.0]])
    out = blend_region_predictions(glob, [first, second], region_weights([left, right], 1, 3), alpha=0.25)
    # pixel 0: only region 1 -> .25·10 + .75·2 = 4; pixel 1: average of regions (3) -> .25·10 + .75·3 = 4.75;
    # pixel 2: no region -> the global prediction
    assert out.flatten().tolist() == pytest.approx([4.0, 4.75, 10.0])


def test_alpha_one_and_no_regions_give_the_global_prediction():
    glob = torch.randn(2, 4, 8, 8)
    region = torch.randn(2, 4, 8, 8)
    mask = torch.rand(8, 8)
    assert torch.allclose(blend_region_predictions(glob, [region], region_weights([mask], 8, 8), alpha=1.0), glob)
    assert blend_region_predictions(glob, [], torch.zeros(0, 8, 8), alpha=0.1) is glob


def test_crop_box_holds_the_region_in_multiples_of_eight():
    mask = box_mask(0.5, 0.25, 0.25, 0.25, (512, 512))
    rows, columns, top, left = crop_box(mask, 64, 64)
    assert (rows, columns) == (16, 16) and (top, left) == (16, 32)
    rows, columns, top, left = crop_box(box_mask(0.9, 0.0, 0.1, 1.0, (100, 100)), 13, 20)
    assert rows == 13 and top == 0  # an axis shorter than the multiple is taken whole
    assert columns == 8 and left + columns == 20 and left <= 18  # grown inwards at the edge, still covering it


def test_layout_preview_draws_each_region_in_its_place():
    left, right = box_mask(0, 0, 0.5, 1, (64, 128)), box_mask(0.5, 0, 0.5, 1, (64, 128))
    image = region_layout([left, right], ["<dog>", ""], 1024, 512)
    assert image.shape == (1, 256, 512, 3)
    left_colour, right_colour = image[0, 200, 100], image[0, 200, 400]
    assert not torch.allclose(left_colour, right_colour)
    assert left_colour[0] > left_colour[2] and right_colour[2] > right_colour[0]  # red-ish, then blue-ish
