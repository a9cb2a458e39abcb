"""Region masks and region noise estimation against hand computations."""

import pytest
import torch

from cidm.errors import CIDMInputError
from cidm.regions import blend_region_predictions, box_mask, mask_at


def test_box_mask_covers_the_box():
    mask = box_mask(0.5, 0.0, 0.5, 1.0, size=4)
    assert mask.tolist() == [[0, 0, 1, 1]] * 4


@pytest.mark.parametrize("args, input_name", [((0, 0, 0, 1), "width"), ((0, 0, 1, 0), "height"),
                                              ((1.5, 0, 0.5, 1), "x"), ((0, -0.1, 0.5, 1), "y")])
def test_bad_boxes_name_the_input(args, input_name):
    with pytest.raises(CIDMInputError) as error:
        box_mask(*args)
    assert error.value.input_name == input_name


def test_mask_is_resampled_with_soft_edges():
    mask = mask_at(box_mask(0.0, 0.0, 0.5, 1.0, size=64), 8, 8)
    assert mask.shape == (8, 8)
    assert mask[:, :4].min() == 1 and mask[:, 5:].max() == 0


def test_blend_matches_hand_computation():
    glob = torch.full((1, 1, 1, 3), 10.0)
    first, second = torch.full((1, 1, 1, 3), 2.0), torch.full((1, 1, 1, 3), 4.0)
    left = torch.tensor([[1.0, 1.0, 0.0]])
    right = torch.tensor([[0.0, 1.0, 0.0]])
    out = blend_region_predictions(glob, [first, second], [left, right], alpha=0.25)
    # pixel 0: only region 1 -> .25·10 + .75·2 = 4; pixel 1: average of regions (3) -> .25·10 + .75·3 = 4.75;
    # pixel 2: no region -> the global prediction
    assert out.flatten().tolist() == pytest.approx([4.0, 4.75, 10.0])


def test_alpha_one_and_no_regions_give_the_global_prediction():
    glob = torch.randn(2, 4, 8, 8)
    region = torch.randn(2, 4, 8, 8)
    mask = torch.rand(8, 8)
    assert torch.allclose(blend_region_predictions(glob, [region], [mask], alpha=1.0), glob)
    assert blend_region_predictions(glob, [], [], alpha=0.1) is glob
