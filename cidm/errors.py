"""Errors raised for bad user input; each names the input at fault so a node can show it verbatim."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class CIDMInputError(ValueError):
    """A user-facing input is invalid. `input_name` is the node input (or file) that caused it."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


def require_finite(**inputs: float | torch.Tensor | Sequence[float] | None) -> None:
    """Refuses NaN and ±inf in node inputs, each given as `input_name=value`.

    A value may be a number, a tensor (an IMAGE [N, H, W, C], a MASK [N, H, W], any shape) or a sequence of
    numbers; None (an unconnected optional input) passes. ComfyUI's min/max validation lets NaN through
    (every comparison with NaN is false), and one NaN in a LoRA scale, a loss weight or a mask turns the whole
    image black without an error, so every float and tensor a node takes goes through this check first.

    Raises:
        CIDMInputError: naming the first input that holds a NaN or an infinity, with how many of its values do.
    """
    for name, value in inputs.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point() or bool(torch.isfinite(value).all()):
                continue
            nan = int(torch.isnan(value).sum())
            inf = value.numel() - nan - int(torch.isfinite(value).sum())
            raise CIDMInputError(name, f"holds non-finite values ({nan} NaN, {inf} ±inf of {value.numel()} "
                                       f"values, shape {tuple(value.shape)}); check the node that made it")
        numbers = value if isinstance(value, Sequence) else [value]
        for index, number in enumerate(numbers):
            if not math.isfinite(number):
                where = f" (item {index + 1})" if numbers is value else ""
                raise CIDMInputError(name, f"must be a finite number, got {number}{where}")
