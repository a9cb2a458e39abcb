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

from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import CIDMInputError, require_finite
from .routing import RunCache

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

    Raises:
        CIDMInputError: naming the input, for unknown units, a non-finite value, a canvas size below 1, a 0-sized
            box, or a box not inside the image.
    """
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

    Raises:
        CIDMInputError: `input_name` (and the item of a batch), for a shape that is not [H, W] or [N, H, W],
            non-finite values, or an empty mask.
    """
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

    Raises:
        CIDMInputError: naming the input, for a non-finite or out-of-range value, a bad mask or a bad box.
    """
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
                             shares: torch.Tensor, alpha: float) -> torch.Tensor:
    """E* (module docstring) for predictions [B, C, h, w] and the regions' shares [U, h, w] at that resolution
    (`region_weights`, made once per sampling run by the caller, on the predictions' device)."""
    if not region_predictions:
        return global_prediction
    weights = shares[:, None, None]
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


@dataclass(frozen=True)
class AttentionBranch:
    """What the image tokens of one batch row attend to in one cross-attention layer, for one branch (the global
    prompt or a region): the branch's context for this layer [T, D], its task weights [K] (None: no concept LoRA)
    and its share of every image token [h·w] (region_weights; the global share is 1 − Σ regions)."""

    context: torch.Tensor
    weights: torch.Tensor | None
    share: torch.Tensor


def row_branches(context: torch.Tensor, weights: torch.Tensor | None, shares: torch.Tensor,
                 regions: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> list[AttentionBranch]:
    """The branches of one batch row: the row's own context [T, D] and task weights [K] (or None) over the global
    share 1 − Σ_u shares[u], then region u's (context [T, D], weights [K] or None) over shares[u] ([U, h·w],
    region_weights). A region context None is a mirror row's (the negative's): it keeps its own context under the
    region's concepts, so classifier-free guidance sees the prompt difference only."""
    branches = [AttentionBranch(context, weights, 1 - shares.sum(dim=0))]
    for (region_context, region_weights_), share in zip(regions, shares):
        branches.append(AttentionBranch(context if region_context is None else region_context, region_weights_,
                                        share))
    return branches


def token_task_weights(rows: list[list[AttentionBranch]], num_tasks: int, like: torch.Tensor) -> torch.Tensor:
    """[B, N, K]: each image token's task weights, Σ_branches share[n] · weights (the to_q / to_out LoRA mix)."""
    out = torch.zeros(len(rows), rows[0][0].share.numel(), num_tasks, dtype=like.dtype, device=like.device)
    for row, branches in enumerate(rows):
        for branch in branches:
            if branch.weights is not None:
                out[row] += branch.share.reshape(-1, 1).to(like) * branch.weights.reshape(1, -1).to(like)
    return out


@dataclass(frozen=True)
class BranchGroup:
    """Branches whose contexts have the same length, attended in one batch: the batch row of each [G] (long), their
    contexts [G, T, D], task weights [G, K] (zeros for a branch without concepts; None without a LoRA bank) and
    shares of every image token [G, N, 1]; `projected`, when made (`with_projected_contexts`), their keys and
    values [G, T, inner]."""

    rows: torch.Tensor
    context: torch.Tensor
    weights: torch.Tensor | None
    shares: torch.Tensor
    projected: tuple[torch.Tensor, torch.Tensor] | None = None

    def keys_values(self, module, bank) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [G, T, inner]: module.to_k / to_v of the contexts plus the branches' LoRA (`bank`)."""
        if self.projected is not None:
            return self.projected
        k, v = module.to_k(self.context), module.to_v(self.context)
        if self.weights is not None:
            k = k + bank.delta("to_k", self.context, self.weights)
            v = v + bank.delta("to_v", self.context, self.weights)
        return k, v


@dataclass(frozen=True)
class RegionAttentionInputs:
    """What region-aware cross-attention needs besides the image tokens, on their device and in their dtype:
    token_weights [B, N, K] (None without a LoRA bank) and the branch groups. Made once per layer and batch layout
    of a sampling run (`prepare_region_attention`), so that a step makes no host-to-device copy and reads nothing
    back to the host: on a GPU either drains the launch queue in every layer (benchmarks/results/gpu-h200.md)."""

    token_weights: torch.Tensor | None
    groups: tuple[BranchGroup, ...]


def prepare_region_attention(rows: list[list[AttentionBranch]], num_tasks: int,
                             like: torch.Tensor) -> RegionAttentionInputs:
    """The inputs of `region_cross_attention` for a batch whose row b has the branches rows[b], on `like`'s device
    and dtype; `num_tasks` is the LoRA bank's K (0: no bank). Branches with no share of any token are left out."""
    groups: dict[int, list[tuple[int, AttentionBranch]]] = {}
    for row, branches in enumerate(rows):
        for branch in branches:
            if bool((branch.share > 0).any()):
                groups.setdefault(branch.context.shape[0], []).append((row, branch))
    made = []
    for members in groups.values():
        weights = None
        if num_tasks:
            weights = torch.stack([torch.zeros(num_tasks, dtype=like.dtype, device=like.device)
                                   if branch.weights is None else branch.weights.to(like) for _, branch in members])
        made.append(BranchGroup(torch.tensor([row for row, _ in members], device=like.device),
                                torch.stack([branch.context for _, branch in members]).to(like), weights,
                                torch.stack([branch.share.reshape(-1) for _, branch in members]).to(like)[..., None]))
    return RegionAttentionInputs(token_task_weights(rows, num_tasks, like) if num_tasks else None, tuple(made))


def with_projected_contexts(inputs: RegionAttentionInputs, module, bank) -> RegionAttentionInputs:
    """`inputs` with every group's keys and values projected once (BranchGroup.keys_values). The contexts and task
    weights are the same in every step of a sampling run, so while the model's weights stay fixed too, so are K and
    V: a step then skips the to_k / to_v projections and their LoRA."""
    return replace(inputs, groups=tuple(replace(group, projected=group.keys_values(module, bank))
                                        for group in inputs.groups))


def region_cross_attention(module, bank, x: torch.Tensor, inputs: RegionAttentionInputs,
                           attention, **attention_kwargs) -> torch.Tensor:
    """Region-aware cross-attention for x [B, N, C] (`inputs` from `prepare_region_attention`); the output has x's
    shape.

    For image token n of row b, with branch shares s_u[n] (Σ_u s_u[n] = 1) and task weights w_u:
        q[n]   = W_q x[n] + Δ_q(x[n]; Σ_u s_u[n] w_u)
        a[n]   = Σ_u s_u[n] · Attention(q[n], K_u, V_u),  K_u = W_k c_u + Δ_k(c_u; w_u), V_u likewise
        out[n] = W_out a[n] + Δ_out(a[n]; Σ_u s_u[n] w_u)
    where Δ_f(·; w) = scale · Σ_t w[t] B_t A_t is `bank`, a LayerLoRABank (cidm.adapters) of the K tasks that
    `inputs` were prepared for. A token inside one region
    sees only that region's prompt through only that region's concepts; a token outside every region sees the
    global prompt with the global routing (Mix-of-Show's regionally controllable sampling, TencentARC/Mix-of-Show,
    mixofshow/pipelines/pipeline_regionally_t2iadapter.py, with per-region LoRAs instead of a fused model).
    Branches whose contexts have the same length are projected and attended in one batch, whatever their row.

    `module` provides to_q, to_k, to_v, to_out and heads; `attention(q, k, v, heads,
    **attention_kwargs)` is the host's multi-head attention on [G, N, heads·d] tensors."""
    q = module.to_q(x)
    if inputs.token_weights is not None:
        q = q + bank.delta("to_q", x, inputs.token_weights)
    mixed = torch.zeros_like(q)
    for group in inputs.groups:
        k, v = group.keys_values(module, bank)
        attended = attention(q[group.rows], k, v, module.heads, **attention_kwargs)
        mixed.index_add_(0, group.rows, attended * group.shares)
    out = module.to_out[0](mixed)
    if inputs.token_weights is not None:
        out = out + bank.delta("to_out.0", mixed, inputs.token_weights)
    return module.to_out[1](out) if len(module.to_out) > 1 else out


class RegionMasks(RunCache):
    """The canvas masks of a sampling run's regions (`masks`: U tensors [H, W] in [0, 1]) and their shares at each
    attention resolution, made once per run."""

    masks: list[torch.Tensor]

    def shares(self, height: int, width: int) -> torch.Tensor:
        """[U, height·width]: `region_weights` at one attention resolution (computed once per resolution)."""
        return self.cached(("shares", height, width),
                           lambda: region_weights(self.masks, height, width).reshape(len(self.masks), -1))


class RegionPlan(RegionMasks):
    """The regions of one sampling run, as region-aware cross-attention needs them in every layer.

    `cond_ids` are the host's ids of the global positive cond entries (ComfyUI: the cond dicts' uuids): their rows
    attend region by region. `mirror_ids` are the negative's: their rows get the same regions, masks and concepts
    but attend to their own (negative) context, so classifier-free guidance sees the prompt difference only, never a
    LoRA difference (as `match cond` does for whole images). Rows of any other cond attend as usual.
    `contexts[u]` is region u's conditioning tensor [1, T, D], `region_ids[u]` the host's id of its cond (through
    which the host's routing gives its layer contexts and concepts, cidm.routing) and `masks[u]` its canvas mask
    [H, W]."""

    def __init__(self, contexts: list[torch.Tensor], masks: list[torch.Tensor], cond_ids, mirror_ids,
                 region_ids: list | None = None):
        self.contexts, self.masks = contexts, masks
        self.region_ids = list(region_ids) if region_ids is not None else [None] * len(contexts)
        self.cond_ids, self.mirror_ids = set(cond_ids), set(mirror_ids)

    def applies_to(self, ids) -> bool:
        return any(i in self.cond_ids or i in self.mirror_ids for i in ids or ())

    def rows(self, ids: list, contexts: torch.Tensor, weights: torch.Tensor | None, size: tuple[int, int],
             layer_context, route) -> list[list[AttentionBranch]]:
        """The branches of every row of a batch made of len(ids) equal chunks, one per host id.

        contexts [B, T, D] and weights [B, K] (or None) are the rows' own layer contexts and routing;
        `layer_context(tensor, region_id)` gives this layer's context of a region's conditioning [1, T, D],
        `route(context, region_id)` its task weights [1, K] (or None)."""
        shares = self.shares(*size).to(contexts.device)
        region_contexts = [layer_context(c.to(contexts), rid)[0] for c, rid in zip(self.contexts, self.region_ids)]
        routed = [route(c[None], rid) for c, rid in zip(region_contexts, self.region_ids)]
        per_chunk = contexts.shape[0] // len(ids)
        rows = []
        for row in range(contexts.shape[0]):
            chunk_id = ids[row // per_chunk]
            own = weights[row] if weights is not None else None
            if chunk_id not in self.cond_ids and chunk_id not in self.mirror_ids:
                rows.append([AttentionBranch(contexts[row], own, torch.ones_like(shares[0]))])
                continue
            mirror = chunk_id not in self.cond_ids
            rows.append(row_branches(contexts[row], own, shares, [
                (None if mirror else context, None if w is None else w[0])
                for context, w in zip(region_contexts, routed)]))
        return rows
