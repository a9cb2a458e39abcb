"""Non-finite numbers in inputs: a clear error naming the input, never a black image (issue 16, kind 2)."""

import math

import pytest
import torch

from cidm.aggregation import make_router
from cidm.consolidation import ConsolidationWeights
from cidm.data import examples_from_image_batch
from cidm.errors import CIDMInputError, require_finite
from cidm.train import TrainingConfig

BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD)
def test_float_inputs_name_the_input(bad):
    require_finite(scale=0.8, strength=1.0, mask=None)
    with pytest.raises(CIDMInputError) as caught:
        require_finite(scale=0.8, strength=bad)
    assert caught.value.input_name == "strength" and "finite" in str(caught.value)


@pytest.mark.parametrize("bad", BAD)
def test_tensor_inputs_count_the_bad_values(bad):
    mask = torch.ones(1, 8, 8)
    require_finite(mask=mask, indices=torch.arange(4))
    mask[0, 2, 3] = bad
    with pytest.raises(CIDMInputError, match=r"mask: holds non-finite values") as caught:
        require_finite(mask=mask)
    assert ("1 NaN" if math.isnan(bad) else "1 ±inf") in str(caught.value)


def test_sequences_name_the_item():
    with pytest.raises(CIDMInputError, match=r"weights: .*nan \(item 2\)"):
        require_finite(weights=[1.0, math.nan])


@pytest.mark.parametrize("field", ["lora_lr", "embedding_lr", "multiplier", "noise_offset"])
@pytest.mark.parametrize("bad", BAD)
def test_training_config_refuses_non_finite(field, bad):
    with pytest.raises(CIDMInputError) as caught:
        TrainingConfig(**{field: bad}).validate()
    assert caught.value.input_name == field


@pytest.mark.parametrize("field,input_name", [("orthogonal", "orthogonal_weight"), ("shared", "shared_weight"),
                                              ("clora", "clora_lambda"), ("official", "official_weight")])
def test_consolidation_weights_refuse_nan(field, input_name):
    config = TrainingConfig(consolidation=ConsolidationWeights(**{field: math.nan}))
    with pytest.raises(CIDMInputError) as caught:
        config.validate()
    assert caught.value.input_name == input_name


def test_image_batch_with_nan_is_refused():
    images = torch.rand(2, 64, 64, 3)
    images[1, 5, 5, 0] = math.nan
    with pytest.raises(CIDMInputError, match="images: holds non-finite"):
        examples_from_image_batch(images, "images")


def test_fixed_aggregation_weights_refuse_nan():
    features = [torch.randn(2, 4, 8), torch.randn(2, 4, 8)]
    with pytest.raises(CIDMInputError, match="weights: .*item 2"):
        make_router("fixed", features, fixed_weights=[0.5, math.inf])
