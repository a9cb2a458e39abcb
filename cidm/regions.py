"""Context-controllable synthesis: region specs, masks at any resolution, and region noise estimation.

The paper's region noise estimation combines a global prediction E with per-region predictions E_u
(E* = α·E + Σ_u (1−α)·E_u ⊙ m_u). Taken literally that scales the background by α; here the background keeps E:

    M  = clamp(Σ_u m_u, 0, 1)
    E* = (1 − M) ⊙ E  +  M ⊙ ( α·E + (1 − α) · Σ_u m_u E_u / Σ_u m_u )

so overlapping regions are averaged and α = 1 gives the plain global prediction. Predictions may be eps or x0:
the blend is affine with weights summing to 1, so it commutes with the eps↔x0 conversion at a fixed x and sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CIDMInputError


@dataclass(frozen=True)
class RegionSpec:
    conditioning: Any  # the host's conditioning for the region prompt
    mask: torch.Tensor  # [H, W] in [0, 1], any resolution
    strength: float = 1.0


def box_mask(x: float, y: float, width: float, height: float, size: int = 64) -> torch.Tensor:
    """A [size, size] mask of the box given as fractions of the image (left, top, width, height)."""
    for name, value in (("x", x), ("y", y), ("width", width), ("height", height)):
        if not 0.0 <= value <= 1.0:
            raise CIDMInputError(name, f"must be a fraction of the image in [0, 1], got {value}")
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise CIDMInputError(name, "the box is empty: give it a size above 0")
    mask = torch.zeros(size, size)
    top, left = round(y * size), round(x * size)
    bottom, right = max(top + 1, round(min(1.0, y + height) * size)), max(left + 1, round(min(1.0, x + width) * size))
    mask[top:bottom, left:right] = 1.0
    return mask


def mask_at(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[height, width] version of a [H, W] (or [1, H, W]) mask, area-averaged so soft edges survive."""
    mask = mask.reshape(-1, *mask.shape[-2:])[:1].float()
    return F.interpolate(mask[None], size=(height, width), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def blend_region_predictions(global_prediction: torch.Tensor, region_predictions: list[torch.Tensor],
                             masks: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """E* for predictions [B, C, h, w] and masks [h, w] (see module docstring)."""
    if not region_predictions:
        return global_prediction
    stacked_masks = torch.stack([m.to(global_prediction) for m in masks])[:, None, None]  # [U, 1, 1, h, w]
    total = stacked_masks.sum(dim=0)
    regional = (stacked_masks * torch.stack(region_predictions)).sum(dim=0) / total.clamp_min(1e-8)
    coverage = total.clamp(0, 1)
    inside = alpha * global_prediction + (1 - alpha) * regional
    return (1 - coverage) * global_prediction + coverage * inside
