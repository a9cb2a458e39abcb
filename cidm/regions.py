"""Context-controllable synthesis: region specs, masks at any resolution, and region noise estimation.

A region is a soft mask over the whole canvas (values in [0, 1]) with its own prompt. Masks reach every resolution
(latent, each attention layer) by exact area averaging, and overlapping regions are normalised:

    w_u = m_u / max(1, Σ_v m_v)        (each region's share of a position; Σ_u w_u ≤ 1)
    w_0 = 1 − Σ_u w_u                  (the global prompt's share)

so two regions covering the same position share it, and a position no region covers belongs to the global prompt.

Region noise estimation (Dong et al., NeurIPS 2024, Sec. 3.3, Eq. 5) combines a global prediction E with per-region
predictions E_u. Taken literally (E* = α·E + Σ_u (1−α)·E_u ⊙ m_u) it scales the background by α; here the
background keeps E:

    E* = w_0 ⊙ E  +  Σ_u w_u ⊙ ( α·E + (1 − α)·E_u )

so α = 1 gives the plain global prediction. Predictions may be eps or x0, cond or guided: the blend is affine with
weights summing to 1, so it commutes with the eps↔x0 conversion at a fixed x and sigma and with classifier-free
guidance against one shared uncond.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CIDMInputError, require_finite

BOX_UNITS = ("fraction", "pixels")


@dataclass(frozen=True)
class RegionSpec:
    """One region: the host's conditioning for its prompt, a [H, W] mask over the whole canvas in [0, 1] (already
    multiplied by `strength`), and a label naming its concepts (for the layout preview)."""

    conditioning: Any
    mask: torch.Tensor
    strength: float = 1.0
    label: str = ""


def _coverage(source: int, target: int) -> torch.Tensor:
    """[target, source]: the share of target cell i that source cell j covers (rows sum to 1), with both axes
    spanning the same unit interval. Exact area averaging for any ratio, up or down."""
    edges_s = torch.arange(source + 1, dtype=torch.float64) / source
    edges_t = torch.arange(target + 1, dtype=torch.float64) / target
    overlap = (torch.minimum(edges_t[1:, None], edges_s[None, 1:]) - torch.maximum(edges_t[:-1, None],
                                                                                   edges_s[None, :-1])).clamp_min(0)
    return (overlap * target).float()


def mask_at(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A [H, W] (or [1, H, W]) canvas mask at [height, width], by exact area averaging: each output cell is the mean
    of the mask over the part of the canvas it covers, so soft edges and thin regions keep their mass at every
    attention resolution (SD1.5 at 512²: 64², 32², 16², 8²)."""
    mask = mask.reshape(mask.shape[-2:]).float()
    rows = _coverage(mask.shape[0], height).to(mask.device)
    columns = _coverage(mask.shape[1], width).to(mask.device)
    return (rows @ mask @ columns.T).clamp(0, 1)


def box_fractions(x: float, y: float, width: float, height: float, units: str = "fraction",
                  canvas_width: int = 512, canvas_height: int = 512) -> tuple[float, float, float, float]:
    """(left, top, width, height) as fractions of the canvas, from a box in `units` ("fraction" of the image, or
    "pixels" of a canvas_width × canvas_height image).

    Raises CIDMInputError naming the input for a non-finite value, a 0-sized box, or a box not inside the image."""
    if units not in BOX_UNITS:
        raise CIDMInputError("units", f"unknown units {units!r}; supported: {', '.join(BOX_UNITS)}")
    values = {"x": x, "y": y, "width": width, "height": height}
    require_finite(**values)
    if units == "pixels":
        for name, size in (("canvas_width", canvas_width), ("canvas_height", canvas_height)):
            if size <= 0:
                raise CIDMInputError(name, f"must be a positive number of pixels, got {size}")
        x, width, y, height = x / canvas_width, width / canvas_width, y / canvas_height, height / canvas_height
    unit = "of the image" if units == "fraction" else f"pixels of the {canvas_width}×{canvas_height} canvas"
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise CIDMInputError(name, f"the box is empty ({name} {values[name]}): give it a size above 0")
    for name, start, size, extent in (("x", x, width, "width"), ("y", y, height, "height")):
        if not 0.0 <= start < 1.0:
            raise CIDMInputError(name, f"the box starts outside the image ({name} = {values[name]} {unit})")
        if start + size > 1.0 + 1e-6:
            raise CIDMInputError(extent, f"the box ends outside the image ({name} + {extent} = "
                                         f"{values[name] + values[extent]:g} {unit}); shrink it or move it")
    return x, y, width, height


def box_mask(left: float, top: float, width: float, height: float, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """A [rows, columns] mask of a box given as canvas fractions: each cell holds the share of it the box covers."""
    rows, columns = size

    def axis(start: float, extent: float, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) / cells
        inside = torch.minimum(edges[1:], torch.tensor(start + extent)) - torch.maximum(edges[:-1], torch.tensor(start))
        return (inside.clamp_min(0) * cells).float()

    return axis(top, height, rows)[:, None] * axis(left, width, columns)[None, :]


def split_masks(mask: torch.Tensor, input_name: str = "mask") -> list[torch.Tensor]:
    """The regions of a MASK input ([H, W], or a batch [N, H, W]: one region per mask), each [H, W] in [0, 1].

    Raises CIDMInputError naming the input (and the item of a batch) for non-finite values or an empty mask."""
    if mask.ndim not in (2, 3) or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise CIDMInputError(input_name, f"expected a MASK [H, W] or a batch [N, H, W], got shape {tuple(mask.shape)}")
    require_finite(**{input_name: mask})
    masks = list(mask.reshape(-1, *mask.shape[-2:]).float())
    for index, item in enumerate(masks):
        where = f" (mask {index + 1} of the batch of {len(masks)})" if len(masks) > 1 else ""
        if float(item.clamp(0, 1).max()) <= 0:
            raise CIDMInputError(input_name, f"is empty (all zero){where}: paint the region, or disconnect it "
                                             "to use the box")
    return [item.clamp(0, 1) for item in masks]


def make_regions(conditioning: Any, label: str, x: float, y: float, width: float, height: float, strength: float,
                 units: str = "fraction", canvas_width: int = 512, canvas_height: int = 512,
                 mask: torch.Tensor | None = None) -> list[RegionSpec]:
    """The regions of one Region Condition: one per mask of a MASK batch, or one for the box (box_fractions);
    each mask spans the whole canvas and is multiplied by `strength` (in [0, 1]).

    Raises CIDMInputError naming the input for a non-finite or out-of-range value, a bad mask or a bad box."""
    require_finite(strength=strength)
    if not 0.0 <= strength <= 1.0:
        raise CIDMInputError("strength", f"must be in [0, 1], got {strength}")
    if mask is not None:
        masks = split_masks(mask)
    else:
        masks = [box_mask(*box_fractions(x, y, width, height, units, canvas_width, canvas_height),
                          size=(canvas_height, canvas_width))]
    return [RegionSpec(conditioning, item * strength, strength, label) for item in masks]


def region_weights(masks: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """[U, height, width]: each region's share w_u of every position (area-averaged masks, overlaps normalised so
    that Σ_u w_u ≤ 1; see the module docstring). The global prompt keeps 1 − Σ_u w_u."""
    stacked = torch.stack([mask_at(mask, height, width) for mask in masks])
    return stacked / stacked.sum(dim=0, keepdim=True).clamp_min(1.0)


def blend_region_predictions(global_prediction: torch.Tensor, region_predictions: list[torch.Tensor],
                             masks: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """E* (module docstring) for predictions [B, C, h, w] and canvas masks [H, W] (any resolution)."""
    if not region_predictions:
        return global_prediction
    weights = region_weights(masks, *global_prediction.shape[-2:]).to(global_prediction)[:, None, None]
    regional = (weights * (alpha * global_prediction + (1 - alpha) * torch.stack(region_predictions))).sum(dim=0)
    return (1 - weights.sum(dim=0)) * global_prediction + regional


def crop_box(mask: torch.Tensor, height: int, width: int, multiple: int = 8) -> tuple[int, int, int, int]:
    """(rows, columns, top, left) of the smallest window of a [height, width] grid holding the mask's support,
    grown to multiples of `multiple` cells (what the UNet needs) and kept inside the grid. Region noise estimation
    runs the UNet on this window only, so its cost follows the region's area."""
    support = mask_at(mask, height, width) > 0
    rows, columns = support.any(dim=1).nonzero().flatten(), support.any(dim=0).nonzero().flatten()

    def span(hits: torch.Tensor, cells: int) -> tuple[int, int]:
        start, stop = int(hits[0]), int(hits[-1]) + 1
        size = min(cells, -(-(stop - start) // multiple) * multiple)
        start = max(0, min(start - (size - (stop - start)) // 2, cells - size))
        return size, start

    (row_size, top), (column_size, left) = span(rows, height), span(columns, width)
    return row_size, column_size, top, left
