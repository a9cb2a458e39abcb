"""Multi-concept LoRA on the cross-attention projections, with per-sample task weights.

Every task t owns, per attn2 layer l and projection f in (to_q, to_k, to_v, to_out.0), factors
down A ∈ R^{r×in} and up B ∈ R^{out×r}. A wrapped projection computes, for sample b,

    f(x_b) = W_f x_b + b_f + scale · Σ_t w[b, t] · B_t A_t x_b

where w comes from a router (elastic aggregation, one-hot, fixed, or "the task being trained"). All tasks run as
one batched low-rank branch: x·[A_1;…;A_K]ᵀ, scaled per (sample, task), then ·[B_1 … B_K]ᵀ — two matmuls
whatever K is.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CIDMInputError
from .layers import PROJECTIONS, CrossAttentionLayer

LayerFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # proj -> (down [r,in], up [out,r])
TaskFactors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (down, up)


def init_task_factors(layers: list[CrossAttentionLayer], rank: int, generator: torch.Generator) -> TaskFactors:
    """Fresh LoRA factors: down ~ kaiming-uniform(a=√5) as nn.Linear does, up = 0, so training starts at the base."""
    factors = {}
    for layer in layers:
        for proj, (out_features, in_features) in layer.projection_shapes().items():
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform with a=√5 reduces to U(-1/√in, 1/√in)
            down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            factors[(layer.index, proj)] = (down, torch.zeros(out_features, rank))
    return factors


class LayerLoRABank:
    """The factors of K tasks for one layer: frozen tasks stacked once, plus an optional trainable task (last).

    Not an nn.Module on purpose: registered under the UNet it would add keys to the host model's state dict."""

    def __init__(self, tasks: list[LayerFactors], scale: float, trainable: LayerFactors | None = None):
        self.scale = scale
        self.trainable = trainable
        self.num_frozen = len(tasks)
        self.num_tasks = len(tasks) + (trainable is not None)
        reference = tasks[0] if tasks else trainable
        self.rank = reference[PROJECTIONS[0]][0].shape[0] if reference else 0
        # [K·r, in] and [out, K·r]: task-major blocks of r rows / columns.
        self.frozen_down = {p: torch.cat([t[p][0] for t in tasks], dim=0) for p in PROJECTIONS} if tasks else {}
        self.frozen_up = {p: torch.cat([t[p][1] for t in tasks], dim=1) for p in PROJECTIONS} if tasks else {}
        self._placed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def frozen_on(self, proj: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the frozen tasks on `device` in `dtype`, copied there once and kept: a training step or a
        sampling step then makes no host-to-device copy of them."""
        key = (proj, torch.device(device), dtype)
        if key not in self._placed:
            self._placed[key] = (self.frozen_down[proj].to(device=device, dtype=dtype),
                                 self.frozen_up[proj].to(device=device, dtype=dtype))
        return self._placed[key]

    def stacked(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trainable is None:
            return self.frozen_down[proj], self.frozen_up[proj]
        down, up = self.trainable[proj]
        if not self.num_frozen:
            return down, up
        # Re-stacked every call so gradients reach the trainable factors on every step.
        frozen_down, frozen_up = self.frozen_on(proj, down.device, down.dtype)
        return torch.cat([frozen_down, down], dim=0), torch.cat([frozen_up, up], dim=1)

    def delta(self, proj: str, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """scale · Σ_t w[b,t] B_t A_t x for x [B, N, in] and weights [B, K] (one mix per sample), or [B, N, K]
        (one mix per token: region-aware attention, cidm.regions.region_cross_attention)."""
        if self.trainable is None:
            down, up = self.frozen_on(proj, x.device, x.dtype)
        else:
            down, up = (t.to(device=x.device, dtype=x.dtype) for t in self.stacked(proj))
        return low_rank_delta(x, down, up, weights, self.rank, self.scale)

    @classmethod
    def combined(cls, banks: list[LayerLoRABank]) -> LayerLoRABank:
        """One bank of scale 1 holding the frozen tasks of `banks` in order (their scales belong in the weights).

        Raises:
            CIDMInputError: ("library") when the banks' ranks differ.
        """
        ranks = {bank.rank for bank in banks if bank.num_frozen}
        if len(ranks) > 1:
            raise CIDMInputError("library", f"the chained libraries' LoRAs have ranks {sorted(ranks)}; region-aware "
                                            "attention mixes them per token and needs one rank")
        merged = cls([], 1.0)
        filled = [bank for bank in banks if bank.num_frozen]
        merged.num_frozen = merged.num_tasks = sum(bank.num_frozen for bank in filled)
        merged.rank = ranks.pop() if ranks else 0
        if filled:
            merged.frozen_down = {p: torch.cat([b.frozen_down[p] for b in filled], dim=0) for p in PROJECTIONS}
            merged.frozen_up = {p: torch.cat([b.frozen_up[p] for b in filled], dim=1) for p in PROJECTIONS}
        return merged

    def select(self, proj: str, tasks: list[int], device: torch.device, dtype: torch.dtype):
        """(down [k·r, in], up [out, k·r]) of the frozen tasks `tasks` only, on `device` in `dtype`: what one
        sampling run computes, so unselected tasks cost nothing."""
        rows = torch.cat([torch.arange(t * self.rank, (t + 1) * self.rank) for t in tasks])
        down = self.frozen_down[proj].index_select(0, rows)
        up = self.frozen_up[proj].index_select(1, rows)
        return down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)

    def folded(self, proj: str, tasks: list[int], weights: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """base [out, in] + scale · Σ_i weights[i] · B_t A_t over t = tasks[i] (weights [k]): the projection's weight
        with these tasks' LoRA folded in, for a batch whose rows all share one mix. Computed in float32 on base's
        device, returned in base's dtype. A sampling run folds once and then runs one plain matmul per projection
        call, where the low-rank branch costs two matmuls, a product and a sum in every layer of every step
        (benchmarks/results/gpu-h200.md)."""
        down, up = self.select(proj, list(tasks), base.device, torch.float32)
        per_rank = rank_weights(weights[None], self.rank, self.scale, down).reshape(1, -1)
        return (base.float() + (up * per_rank) @ down).to(base.dtype)


def low_rank_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, rank: int,
                   scale: float) -> torch.Tensor:
    """scale · Σ_t w[b,t] B_t A_t x for x [B, N, in], stacked factors down [K·r, in] / up [out, K·r] (task-major
    blocks of `rank`) and weights [B, K] (one mix per sample) or [B, N, K] (one mix per token: region-aware
    attention, cidm.regions.region_cross_attention); two matmuls whatever K is."""
    return apply_low_rank(x, down, up, rank_weights(weights, rank, scale, x))


def rank_weights(weights: torch.Tensor, rank: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """scale · weights [B, K] or [B, N, K], each task's weight repeated over its `rank` columns, on `like`'s device
    and dtype: [B, 1, K·r] or [B, N, K·r]. A sampling run makes it once per layer and batch (nodes/host)."""
    per_rank = weights.to(device=like.device, dtype=like.dtype).repeat_interleave(rank, dim=-1)
    return scale * (per_rank if per_rank.ndim == 3 else per_rank.unsqueeze(1))


def apply_low_rank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, per_rank: torch.Tensor) -> torch.Tensor:
    """(x Aᵀ ⊙ per_rank) Bᵀ for x [B, N, in], down [K·r, in], up [out, K·r] and per_rank from `rank_weights`."""
    return F.linear(F.linear(x, down) * per_rank, up)


class Router(Protocol):
    """Per-sample task weights for one layer: [B, K], from that layer's own context."""

    def __call__(self, layer_index: int, context: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
        ...


AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def scaled_dot_product_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on [B, N, heads·d] tensors (the default when the host gives none)."""
    batch, _, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.view(batch, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, inner)


def select_layer_context(context: torch.Tensor, layer_index: int, num_layers: int,
                         tokens_per_layer: int) -> torch.Tensor:
    """Layer l's slice of a packed [B, num_layers·T, D] context; any other length is a plain prompt, used as is.

    Packing the layer contexts along the token axis lets them ride in an ordinary CONDITIONING through ComfyUI's
    batching; a model without this adapter attends over all copies and still samples sensibly."""
    if num_layers > 1 and context.shape[1] == num_layers * tokens_per_layer:
        return context[:, layer_index * tokens_per_layer:(layer_index + 1) * tokens_per_layer]
    return context


class ConceptCrossAttention(nn.Module):
    """A cross-attention layer with K tasks' LoRA branches mixed per sample.

    The original module's projections are re-registered under their own names (to_q, to_k, to_v, to_out) so the
    host's weight patches (stock LoRAs) still find them; the original module itself is kept unregistered."""

    def __init__(self, original: nn.Module, layer: CrossAttentionLayer, bank: LayerLoRABank, router: Router,
                 num_layers: int, tokens_per_layer: int = 77,
                 attention: AttentionFunction = scaled_dot_product_heads):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "router", router)
        self.layer = layer
        self.heads = original.heads
        self.num_layers = num_layers
        self.tokens_per_layer = tokens_per_layer
        object.__setattr__(self, "attention", attention)

    def project(self, proj: str, linear: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        out = linear(x)
        if weights is not None and self.bank.num_tasks:
            out = out + self.bank.delta(proj, x, weights)
        return out

    def forward_layer(self, x: torch.Tensor, context: torch.Tensor | None, value: torch.Tensor | None = None,
                      cond_or_uncond: list[int] | None = None, **attention_kwargs) -> torch.Tensor:
        context = x if context is None else select_layer_context(
            context, self.layer.index, self.num_layers, self.tokens_per_layer)
        if value is not None:
            value = select_layer_context(value, self.layer.index, self.num_layers, self.tokens_per_layer)
        weights = self.router(self.layer.index, context, cond_or_uncond) if self.bank.num_tasks else None
        q = self.project("to_q", self.to_q, x, weights)
        k = self.project("to_k", self.to_k, context, weights)
        v = self.project("to_v", self.to_v, context if value is None else value, weights)
        out = self.attention(q, k, v, self.heads, **attention_kwargs)
        out = self.project("to_out.0", self.to_out[0], out, weights)
        return self.to_out[1](out) if len(self.to_out) > 1 else out
