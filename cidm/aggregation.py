"""Which tasks apply to a prompt, per layer: `named` (the default), the paper's elastic weights, one-hot, fixed.

`named`: a task applies at weight 1 when the prompt names its concept (one of its tokens), else at 0, and its LoRA
is then not computed. `named-elastic` mixes only the named tasks by their elastic weights (renormalised over them).
Every mode's weight is multiplied by the task's stored multiplier (`cidm.routing.route_conds`).

Elastic weight aggregation (EWA, the paper's Sec. 3.3): per-layer task weights from the prompt's own context.

For layer l, with ĥ_{b,c} the L2-normalised context token c of sample b and ê_w the L2-normalised concept feature w
(the layer-l encoding of the concept tokens, stored with each task):

    s[b,w]  = max_c ⟨ê_w, ĥ_{b,c}⟩            (max over all context positions)
    g[b,k]  = mean_{w ∈ task k} s[b,w]
    ω[b,k]  = g[b,k]^p / Σ_k' |g[b,k']^p|      (p = 4 in the official code)

`one-hot` puts all weight on argmax_k g; `fixed` uses user weights for every sample.

Source: the official CIDM code, JiahuaDong/CIFC@9819aa8 `lib/models/edlora.py` `EDLoRA_FusionAttnProcessor`.

Unconditional rows, per call (the diffusers backend; ComfyUI sampling pairs per cond, see cidm.routing):
"match cond" (the official code: it routes the cond half, `.chunk(2)[1]`, and reuses those
weights for the uncond half) gives each uncond row the weights of the cond row it is paired with
in the same batch, so classifier-free guidance only sees the prompt difference, not a LoRA difference. Where the
batch holds no cond rows (cond and uncond evaluated in separate calls) the rows fall back to their own weights.
"own" always routes every row from its own context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import CIDMInputError, require_finite
from .routing import UNCOND_POLICIES, LayerwisePrompt

MODES = ("named", "named-elastic", "elastic", "one-hot", "fixed")


def ewa_weights(context: torch.Tensor, features: torch.Tensor, spans: list[tuple[int, int]],
                power: float = 4.0) -> torch.Tensor:
    """ω [B, K] for context [B, T, D], concept features [N, D] of all tasks, and each task's [start, end) in N."""
    similarity = torch.einsum("nd,btd->bnt", F.normalize(features.to(context), dim=-1),
                              F.normalize(context, dim=-1))
    best = similarity.amax(dim=2)  # [B, N]
    per_task = torch.stack([best[:, start:end].mean(dim=1) for start, end in spans], dim=1)  # [B, K]
    powered = per_task.pow(power)
    total = powered.abs().sum(dim=1, keepdim=True)
    return powered / total.clamp_min(torch.finfo(powered.dtype).tiny)


def one_hot_weights(scores: torch.Tensor) -> torch.Tensor:
    return F.one_hot(scores.argmax(dim=1), scores.shape[1]).to(scores.dtype)


def match_uncond_to_cond(weights: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
    """Copies the first cond chunk's weights onto every uncond chunk (chunks are equal slices of the batch)."""
    if not cond_or_uncond or 0 not in cond_or_uncond or 1 not in cond_or_uncond:
        return weights
    chunks = list(weights.chunk(len(cond_or_uncond)))
    cond = chunks[cond_or_uncond.index(0)]
    return torch.cat([cond if kind == 1 else chunk for kind, chunk in zip(cond_or_uncond, chunks)])


class ElasticRouter:
    """Routes every layer's tasks from the layer's context; `features[k]` is task k's [n_tokens, L, D]."""

    def __init__(self, features: list[torch.Tensor], one_hot: bool = False, power: float = 4.0,
                 uncond: str = "match cond"):
        """`features[k]`: task k's concept features [n_k, L, D]; `power`: p above; `uncond`: an UNCOND_POLICIES entry.

        Raises:
            CIDMInputError: ("uncond_weights") for an unknown policy.
        """
        if uncond not in UNCOND_POLICIES:
            raise CIDMInputError("uncond_weights", f"unknown policy {uncond!r}; supported: {', '.join(UNCOND_POLICIES)}")
        self.one_hot, self.power, self.uncond = one_hot, power, uncond
        self.spans, start = [], 0
        for task_features in features:
            self.spans.append((start, start + task_features.shape[0]))
            start += task_features.shape[0]
        # [L, N, D]: every task's concept tokens, per layer; computed once, not per step.
        self.features = torch.cat(features, dim=0).transpose(0, 1).contiguous()

    def scores(self, layer_index: int, context: torch.Tensor) -> torch.Tensor:
        return ewa_weights(context, self.features[layer_index], self.spans, self.power)

    def route(self, prompt: LayerwisePrompt | None, context: torch.Tensor, num_layers: int) -> torch.Tensor:
        """[L, K] for one cond: layer l scored on the prompt's layer-l context (the ordinary context [T, D] for a
        prompt without layer contexts)."""
        contexts = layer_contexts(prompt, context, num_layers)
        weights = torch.cat([self.scores(layer, contexts[layer:layer + 1]) for layer in range(num_layers)])
        return one_hot_weights(weights) if self.one_hot else weights

    def __call__(self, layer_index: int, context: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
        weights = self.scores(layer_index, context)
        if self.one_hot:
            weights = one_hot_weights(weights)
        return match_uncond_to_cond(weights, cond_or_uncond) if self.uncond == "match cond" else weights


class ConstantRouter:
    """The same weights for every sample and layer: `fixed` mode, and the training forward (the task being trained,
    plus the merged old tasks for the sequential-merging baselines)."""

    def __init__(self, weights: list[float]):
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def __call__(self, layer_index: int, context: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
        return self.weights.to(context).expand(context.shape[0], -1)

    def route(self, prompt: LayerwisePrompt | None, context: torch.Tensor, num_layers: int) -> torch.Tensor:
        return self.weights.expand(num_layers, -1).clone()


class RowRouter:
    """Weights computed beforehand for every row of a batch [B, L, K] (each prompt routed once by any mode's
    `route`, an uncond row given its cond row's weights by the caller), served per layer as the diffusers
    backend's per-call Router."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, layer_index: int, context: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
        return self.weights[:, layer_index].to(context)


def layer_contexts(prompt: LayerwisePrompt | None, context: torch.Tensor | None, num_layers: int) -> torch.Tensor:
    """[L, T, D]: the prompt's layer contexts, or its one ordinary context [T, D] for every layer.

    Raises:
        CIDMInputError: ("conditioning") for a cond with neither.
    """
    if prompt is not None and prompt.contexts is not None:
        return prompt.contexts.float()
    if context is None:
        raise CIDMInputError("conditioning", "a cond without a text context cannot be routed by elastic weights")
    return context.float().expand(num_layers, -1, -1)


class NamedRouter:
    """Weight 1 on every task the prompt names (any of its tokens), 0 elsewhere; with `elastic`, the named tasks are
    mixed by their elastic weights renormalised over them. A stock prompt names nothing."""

    def __init__(self, task_tokens: list[list[str]], elastic: ElasticRouter | None = None):
        self.task_tokens = [frozenset(tokens) for tokens in task_tokens]
        self.elastic = elastic

    def named(self, prompt: LayerwisePrompt | None) -> torch.Tensor:
        """[K] 1.0 for each task the prompt names, else 0.0."""
        tokens = set(prompt.tokens) if prompt is not None else set()
        return torch.tensor([float(bool(task & tokens)) for task in self.task_tokens])

    def route(self, prompt: LayerwisePrompt | None, context: torch.Tensor, num_layers: int) -> torch.Tensor:
        named = self.named(prompt).expand(num_layers, -1)
        if self.elastic is None or not named.any():
            return named.clone()
        mixed = self.elastic.route(prompt, context, num_layers) * named
        return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny)


def make_router(mode: str, features: list[torch.Tensor], power: float = 4.0, uncond: str = "match cond",
                fixed_weights: list[float] | None = None, task_tokens: list[list[str]] | None = None):
    """The router of a MODES entry: `named` and `named-elastic` from `task_tokens` (one list per task; see
    NamedRouter), `elastic` and `one-hot` from `features` (see ElasticRouter), `fixed` applies `fixed_weights` (one
    per task) to every sample and layer.

    Raises:
        CIDMInputError: ("mode") for an unknown mode or a named mode without every task's tokens; ("weights") when
            fixed mode does not get one finite weight per task; ("uncond_weights") for an unknown uncond policy.
    """
    if mode not in MODES:
        raise CIDMInputError("mode", f"unknown mode {mode!r}; supported: {', '.join(MODES)}")
    if mode in ("named", "named-elastic"):
        if task_tokens is None or len(task_tokens) != len(features):
            raise CIDMInputError("mode", f"{mode} routing needs every task's tokens")
        return NamedRouter(task_tokens, ElasticRouter(features, power=power) if mode == "named-elastic" else None)
    if mode == "fixed":
        if fixed_weights is None or len(fixed_weights) != len(features):
            raise CIDMInputError("weights", f"fixed mode needs one weight per task ({len(features)}), "
                                            f"got {0 if fixed_weights is None else len(fixed_weights)}")
        require_finite(weights=fixed_weights)
        return ConstantRouter(fixed_weights)
    return ElasticRouter(features, one_hot=mode == "one-hot", power=power, uncond=uncond)
