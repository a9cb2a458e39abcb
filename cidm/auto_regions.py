"""Automatic regions: each concept a prompt names finds its own region from its tokens' cross-attention, in a short
probe at the start of the same sampling run (same noise, same sigmas), with no box drawn.

1. Probe. The first `ProbeSettings.probe_steps` steps sample as usual (the global prompt under its routing, and
   any region the user drew). In every attn2 layer whose grid is the latent's halved log2(`downscale`) times
   (`probe_grid`: SD1.5 at 512², 16²; SDXL at 1024², 32²), `AttentionProbe` records, for the positive prompt's rows, each concept's attention map
   a_c[n]: the probability softmax(q·kᵀ/√d) that image token n gives the concept's tokens, averaged over heads and
   the concept's token positions (q and k as the layer computes them, concept LoRAs and layer-wise tokens
   included), then over the probe's layers and steps (`concept_attention`).
2. Scores. A contrastive score per concept, s_c = C·a_c − Σ_{c'≠c} a_{c'} for C concepts, min–max normalised per
   concept to [0, 1] (`contrastive_scores`; FreeFuse's score, yaoliliu/FreeFuse@720644e2,
   freefuse_comfyui/freefuse_core/attention_replace.py:1047-1053).
3. Assignment. A cell goes to the concept with the highest score when that score reaches `threshold`; the rest
   stays with the global prompt. Regions are disjoint, so no cell ever mixes two concepts (`auto_masks`).
4. Fallback. The probe cannot place the concepts when a concept's region is smaller than `min_area` of the grid
   (its map collapsed), or when two concepts' most attended cells (`hot_cells`: those of its raw map at least
   `hot_level` of the way from the map's minimum to its maximum) overlap with an intersection over union above
   `max_overlap` (the maps do not tell them apart). Then `auto_masks` returns
   no masks and says why; the caller samples with plain `named` routing, never with merged regions.

The sampling run then goes on from the probe's last step with the regions (cidm.regions, region-aware
cross-attention): each region attends to the global prompt through its own concept's LoRA only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CIDMInputError


@dataclass(frozen=True)
class ProbeSettings:
    """How the probe runs and reads its maps (module docstring). `steps`: the share of the sampling steps the
    probe takes (at least one, never all); `downscale`: a power of two, the probed attention grid against the
    latent; `threshold`, `min_area`, `max_overlap` and `hot_level` in [0, 1]. Defaults: the toy world's sweep
    (benchmarks/results/toyworld/v2.6-31-auto-regions/README.md)."""

    steps: float = 0.2
    downscale: int = 4
    threshold: float = 0.4
    min_area: float = 0.02
    max_overlap: float = 0.5
    hot_level: float = 0.5

    def __post_init__(self):
        for name in ("steps", "threshold", "min_area", "max_overlap", "hot_level"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise CIDMInputError(f"probe_{name}", f"must be in [0, 1], got {value}")
        if self.downscale < 1 or self.downscale & (self.downscale - 1):
            raise CIDMInputError("probe_downscale", f"must be a power of two, got {self.downscale}")

    def probe_steps(self, steps: int) -> int:
        """How many of `steps` sampling steps (≥ 2) the probe runs: round(share · steps), at least 1, at most
        steps − 1."""
        return min(steps - 1, max(1, round(self.steps * steps)))


def probe_grid(latent_size: tuple[int, int], downscale: int) -> tuple[int, int]:
    """(h, w) of the attention grid `downscale` times coarser than a latent of `latent_size`: each halving rounds
    up, as a UNet's stride-2 convolutions with padding 1 do (a 60-row latent: 30, 15, 8)."""
    height, width = latent_size
    while downscale > 1:
        height, width, downscale = -(-height // 2), -(-width // 2), downscale // 2
    return height, width


def latent_masks(masks: torch.Tensor, downscale: int, size: tuple[int, int]) -> list[torch.Tensor]:
    """The probe grid's masks [C, h, w] at the latent's size `size` (H, W): each grid cell covers `downscale` latent
    cells from the top-left, as the UNet's rounded-up halvings lay it out (`probe_grid`), so the last row and
    column are cut where the latent ends."""
    cells = masks.repeat_interleave(downscale, dim=1).repeat_interleave(downscale, dim=2)
    return list(cells[:, :size[0], :size[1]])


def concept_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: list[list[int]]) -> torch.Tensor:
    """[B, C, N]: for image tokens q [B, N, heads·d] and context tokens k [B, T, heads·d], the attention
    probability softmax(q·kᵀ/√d) over the T tokens, averaged over heads, then over each concept's token positions
    (positions[c], indices into T)."""
    batch, tokens, inner = q.shape
    dim = inner // heads
    q = q.float().view(batch, tokens, heads, dim).transpose(1, 2)
    k = k.float().view(batch, -1, heads, dim).transpose(1, 2)
    probabilities = (q @ k.transpose(-1, -2) * dim ** -0.5).softmax(dim=-1).mean(dim=1)  # [B, N, T]
    return torch.stack([probabilities[..., list(p)].mean(dim=-1) for p in positions], dim=1)


class AttentionProbe:
    """Collects the concepts' attention maps over the probed layers and steps of one sampling run: the host calls
    `observe` with the positive prompt's rows (one per latent of the batch) in every attn2 layer whose grid
    `wants`."""

    def __init__(self, positions: list[list[int]], grid: tuple[int, int]):
        """`positions[c]`: concept c's token positions in the positive prompt's context; `grid`: the probed
        attention grid (`probe_grid`)."""
        self.positions, self.grid = positions, tuple(grid)
        self.total: torch.Tensor | None = None
        self.calls = 0

    def wants(self, size) -> bool:
        return tuple(size) == self.grid

    def observe(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """Adds the maps of one layer call: q [B, h·w, heads·d], k [B, T, heads·d] of the B positive rows."""
        maps = concept_attention(q, k, heads, self.positions)
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def maps(self) -> torch.Tensor | None:
        """[B, C, h, w]: the mean map per latent and concept (on the CPU), or None when no layer had the grid."""
        if self.total is None:
            return None
        return (self.total / self.calls).reshape(*self.total.shape[:2], *self.grid).cpu()


def contrastive_scores(maps: torch.Tensor) -> torch.Tensor:
    """[C, h, w]: s_c = C·a_c − Σ_{c'≠c} a_{c'} for maps a [C, h, w], min–max normalised per concept to [0, 1]."""
    count = maps.shape[0]
    scores = count * maps - (maps.sum(dim=0, keepdim=True) - maps)
    flat = scores.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def hot_cells(maps: torch.Tensor, level: float) -> torch.Tensor:
    """[C, h·w] bool: the cells of each map of maps [C, h, w] at least `level` of the way from its minimum to its
    maximum."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return flat >= low + level * (high - low)


@dataclass(frozen=True)
class AutoMasks:
    """What the probe found: `masks` [C, h, w] in {0, 1} and disjoint (None when the concepts could not be
    placed), and `problem`, why there are no masks ('' otherwise)."""

    masks: torch.Tensor | None
    problem: str = ""


def auto_masks(maps: torch.Tensor, names: list[str], settings: ProbeSettings) -> AutoMasks:
    """One latent's regions from its concepts' maps [C, h, w] (`AttentionProbe.maps`), concept c named names[c]
    (module docstring, steps 2 to 4)."""
    scores = contrastive_scores(maps)
    best = scores.max(dim=0)
    masks = torch.stack([(best.indices == c) & (best.values >= settings.threshold) for c in range(len(names))]).float()
    top = hot_cells(maps, settings.hot_level)
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            overlap = float((top[first] & top[second]).sum() / (top[first] | top[second]).sum())
            if overlap > settings.max_overlap:
                return AutoMasks(None, f"{names[first]} and {names[second]} attend to the same places "
                                               f"(their most attended cells overlap {overlap:.0%}, above {settings.max_overlap:.0%})")
    for name, mask in zip(names, masks):
        area = float(mask.mean())
        if area < settings.min_area:
            return AutoMasks(None, f"{name}'s attention collapsed (its region would hold {area:.1%} of the "
                                           f"image, under {settings.min_area:.0%})")
    return AutoMasks(masks)
