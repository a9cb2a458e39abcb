"""The PIL plots the nodes show: labels are readable and never cut."""

import numpy as np
import torch

from cidm.plots import heatmap

LONG = ["1:golden_retriever_puppy", "2:duck", "3:ink_painting_style"]


def ink_columns(image: torch.Tensor, top: int, bottom: int) -> np.ndarray:
    """x positions of dark pixels between rows top and bottom."""
    band = image[0, top:bottom].numpy().mean(-1)
    return np.nonzero((band < 0.5).any(0))[0]


def test_heatmap_draws_full_column_labels():
    matrix = torch.rand(16, 3)
    image = heatmap(matrix, [f"layer {i}" for i in range(16)], LONG, "elastic weights")
    short = heatmap(matrix, [f"layer {i}" for i in range(16)], ["1:g", "2:d", "3:i"], "elastic weights")
    # The header row of each column holds its whole label: longer labels widen the image and the header ink
    # reaches further right than the cells of a 4-character labelling.
    assert image.shape[2] > short.shape[2] + 150
    header = ink_columns(image, 30, 52)
    assert header.max() > short.shape[2]
    assert image.shape[1] >= 16 * 26


def test_heatmap_is_large_enough_to_read():
    image = heatmap(torch.rand(16, 2), [f"layer {i}" for i in range(16)], ["1:dog", "2:duck"], "weights")
    assert image.shape[1] >= 400 and image.shape[2] >= 200
    assert image.min() >= 0 and image.max() <= 1


def test_a_nan_cell_is_drawn_empty_not_as_the_largest_value():
    """Issue 34's forgetting plot: a concept not learned yet has NaN cells, which must not look like a score of 1."""
    nan = heatmap(torch.tensor([[float("nan")]]), ["dog"], ["after 1"], "IA")
    one = heatmap(torch.tensor([[1.0]]), ["dog"], ["after 1"], "IA")
    assert nan.shape == one.shape
    coloured = lambda image: float((image[0].mean(-1) < 0.9).float().mean())  # noqa: E731  (not white)
    assert coloured(nan) < coloured(one) / 2
