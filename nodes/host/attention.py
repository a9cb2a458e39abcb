"""The cross-attention patches, all ModelPatcher object patches on a clone (the shared model is never mutated).

Sampling (`add_library_patch`, one call per Elastic Aggregate node; chained nodes compose):
- each SD1.5 BasicTransformerBlock's `forward` becomes a `RoutedTransformerBlock`: it replaces the context of the
  batch's CIDM prompts by their layer context (`SamplingRoutes.layer_context`) and opens a `LayerCall` with the
  rows' task weights for the block's attn2;
- each attn2 projection's `forward` (to_q, to_k, to_v, to_out.0) becomes a `LoRAProjection`: the original forward
  plus the LoRA of the tasks with a nonzero weight in this batch, or, when every row of the batch has the same
  task weights, one matmul with that LoRA folded into the weight once per run (`LayerCall.projection`). The module
  tree is unchanged, so stock LoRA weight patches keep their keys, and an attn2 replace patch (IPAdapter's
  `set_model_attn2_replace`), which calls the projections directly instead of attn2.forward, still gets CIDM's
  LoRAs and layer contexts;
- a `WrappersMP.OUTER_SAMPLE` wrapper (`RoutingWrapper`) builds the run's `cidm.routing.SamplingRoutes` from the
  guider's conds and puts it in `transformer_options[ROUTES_KEY]`: what routes every row by its cond's uuid, whatever
  ComfyUI batches together. Its data layout, for reuse by other attention code, is in `cidm/routing.py`.

Training (`ComfyCrossAttention`): the whole attn2 module is replaced by cidm's ConceptCrossAttention with the
trainable bank, on the training denoiser's clone.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

import torch
import torch.nn.functional as F

import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention, optimized_attention_masked

from ...cidm.adapters import ConceptCrossAttention, LayerLoRABank, apply_low_rank, rank_weights
from ...cidm.layers import PROJECTIONS, cross_attention_layers
from ...cidm.routing import (PROMPT_KEY, REGION_PREFIX, ROUTES_KEY, CondEntry, CondRouter, SamplingRoutes,
                             route_conds)
from .model import UNET_PREFIX, unet_of, weights_fixed_for_run

ROUTING_WRAPPER_KEY = "cidm_routing"


class ComfyCrossAttention(ConceptCrossAttention):
    """ConceptCrossAttention with ComfyUI's attn2 call signature and attention kernels."""

    def __init__(self, original, layer, bank, router, num_layers, tokens_per_layer):
        super().__init__(original, layer, bank, router, num_layers, tokens_per_layer, attention=self._attend)

    def _attend(self, q, k, v, heads, mask=None, transformer_options=None):
        options = transformer_options or {}
        precision = getattr(self.original, "attn_precision", None)
        if mask is None:
            return optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=options)
        return optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                          transformer_options=options)

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        return self.forward_layer(x, context, value, cond_or_uncond=transformer_options.get("cond_or_uncond"),
                                  mask=mask, transformer_options=transformer_options)


class LibraryAdapter:
    """One library's patch (one Elastic Aggregate node): per layer its LoRA bank (node scale), its router, each
    task's multiplier [K] and the uncond policy. `key` names it in SamplingRoutes."""

    def __init__(self, banks: dict[int, LayerLoRABank], router: CondRouter, multipliers: torch.Tensor, uncond: str):
        self.key = uuid.uuid4().hex
        self.banks, self.router, self.multipliers, self.uncond = banks, router, multipliers, uncond


class BatchRoute:
    """One attn2 layer's routing for one batch layout (cond uuids, rows, device, dtype) of a sampling run, made once
    per run: per adapter with a task on, (adapter, its tasks, their row weights [B, k]); `shared`, when every row has
    the same weights (one positive and a negative under "match cond"), per active adapter (adapter, tasks, the shared
    row [k]), else None; and per projection, what its calls apply (`projections`, filled on first use)."""

    def __init__(self, active: list, shared: tuple | None):
        self.active, self.shared = active, shared
        self.projections: dict[str, tuple] = {}


NO_ROUTE = BatchRoute([], None)


class LayerCall:
    """One attn2 layer's state while its transformer block runs (its BatchRoute). Read by the layer's four
    LoRAProjections through `projection`: the LoRA folded into their weight once per run when every row shares its
    weights, added per row otherwise."""

    def __init__(self, layer: int, adapters: tuple[LibraryAdapter, ...]):
        self.layer, self.adapters = layer, adapters
        self.adapter_keys = tuple(adapter.key for adapter in adapters)
        self.routes: SamplingRoutes | None = None
        self.uuids, self.batch = None, 0
        self.route = NO_ROUTE

    @property
    def active(self) -> list:
        return self.route.active

    def open(self, routes: SamplingRoutes, uuids: list, batch: int, like: torch.Tensor) -> None:
        self.routes, self.uuids, self.batch = routes, uuids, batch
        key = ("rows", self.adapter_keys, self.layer, tuple(uuids), batch, like.device, like.dtype)
        self.route = routes.cached(key, lambda: self._route(routes, uuids, batch, like.device))

    def _route(self, routes, uuids, batch, device) -> BatchRoute:
        active, shared = [], []
        for adapter in self.adapters:
            weights = routes.row_weights(adapter.key, self.layer, uuids, batch)
            tasks = tuple(weights.ne(0).any(dim=0).nonzero().flatten().tolist())
            if tasks:
                chosen = weights[:, list(tasks)]
                active.append((adapter, tasks, chosen.to(device)))
                shared.append((adapter, tasks, chosen[0]) if bool((chosen == chosen[:1]).all()) else None)
        return BatchRoute(active, tuple(shared) if active and None not in shared else None)

    def close(self) -> None:
        self.routes, self.uuids, self.route = None, None, NO_ROUTE

    # For attention code that mixes the LoRAs itself (region-aware attention, nodes/host/regions.py) ----------
    @property
    def bank(self) -> LayerLoRABank:
        """Every adapter's tasks of this layer in one bank of scale 1; the weights below carry the scales. Made once
        per sampling run, so its device copies (LayerLoRABank.frozen_on) go with the run."""
        banks = [adapter.banks[self.layer] for adapter in self.adapters]
        return self.routes.cached(("bank", self.layer), lambda: LayerLoRABank.combined(banks))

    def row_weights(self) -> torch.Tensor:
        """[B, K_all] weights of the open batch's rows over `bank`'s tasks."""
        return torch.cat([self.routes.row_weights(a.key, self.layer, self.uuids, self.batch) * a.banks[self.layer].scale
                          for a in self.adapters], dim=1)

    def cond_weights(self, uuid) -> torch.Tensor:
        """[K_all] weights of one cond of the run (e.g. a region's prompt) over `bank`'s tasks."""
        return torch.cat([self.routes.weights[a.key][uuid][self.layer] * a.banks[self.layer].scale
                          for a in self.adapters])

    def cond_context(self, uuid, context: torch.Tensor) -> torch.Tensor:
        """This layer's context [1, T, D] of one cond whose ordinary context is `context` [1, T, D]."""
        return self.routes.layer_context(self.layer, [uuid], context)

    @contextlib.contextmanager
    def lora_suspended(self):
        """The projections add no LoRA inside: the caller applies `bank` itself."""
        route, self.route = self.route, NO_ROUTE
        try:
            yield
        finally:
            self.route = route

    def projection(self, proj: str, forward, x: torch.Tensor) -> tuple:
        """What projection `proj` (the host's `forward`, a bound method of its module) applies to input x [B, N, in]
        in this batch, made on its first call of the run: ("folded", weight, bias), the active tasks' LoRA folded
        into the weight (LayerLoRABank.folded), or ("delta", [(down, up, per_rank), ...]), the factors and per-rank
        weights of each active adapter on x's device in its dtype, for `apply_low_rank` on top of the host's
        forward. Either way a step copies nothing from the host.

        Folded when every row of the batch shares its task weights, the run keeps the weights fixed
        (RunCache.static_weights), and the host runs its module as a plain torch Linear with its weight on x's device
        in x's dtype; otherwise ComfyUI casts or patches the weight in its own forward (comfy/ops.py, v0.3.75:
        lowvram, manual cast, weight functions), and the delta goes on top of that."""
        made = self.route.projections.get(proj)
        if made is None:
            made = self.route.projections[proj] = self._projection(proj, getattr(forward, "__self__", None), x)
        return made

    def _projection(self, proj, linear, x) -> tuple:
        weight = getattr(linear, "weight", None)
        if (self.route.shared is not None and self.routes.static_weights and weight is not None
                and not getattr(linear, "comfy_cast_weights", False) and not getattr(linear, "weight_function", None)
                and not getattr(linear, "bias_function", None)
                and weight.device == x.device and weight.dtype == x.dtype):
            for adapter, tasks, row in self.route.shared:
                weight = adapter.banks[self.layer].folded(proj, list(tasks), row, weight)
            return "folded", weight, linear.bias
        factors = []
        for adapter, tasks, weights in self.route.active:
            bank = adapter.banks[self.layer]
            factors.append((*bank.select(proj, list(tasks), x.device, x.dtype),
                            rank_weights(weights, bank.rank, bank.scale, x)))
        return "delta", factors


def layer_call(attn2) -> LayerCall | None:
    """The LayerCall of an attn2 module patched by add_library_patch (None for a model without CIDM concepts)."""
    forward = getattr(attn2.to_q, "forward", None)
    return forward.call if isinstance(forward, LoRAProjection) else None


class LoRAProjection:
    """An attn2 projection's forward plus the open LayerCall's LoRA delta."""

    def __init__(self, forward, proj: str, call: LayerCall):
        self.forward, self.proj, self.call = forward, proj, call

    def __call__(self, x):
        if not self.call.active:
            return self.forward(x)
        made = self.call.projection(self.proj, self.forward, x)
        if made[0] == "folded":
            return F.linear(x, made[1], made[2])
        out = self.forward(x)
        for down, up, per_rank in made[1]:
            out = out + apply_low_rank(x, down, up, per_rank)
        return out


class RoutedTransformerBlock:
    """A BasicTransformerBlock's forward that routes its attn2 per cond (see the module docstring)."""

    def __init__(self, forward, call: LayerCall):
        self.forward, self.call = forward, call
        self.warned = False

    def __call__(self, x, context=None, transformer_options={}):
        routes, uuids = transformer_options.get(ROUTES_KEY), transformer_options.get("uuids")
        if routes is None or not uuids or context is None:
            if not self.warned:
                logging.warning("CIDM: the model was called outside a ComfyUI sampler (no cond uuids); the concept "
                                "LoRAs of Elastic Aggregate LoRAs are not applied to this call")
                self.warned = True
            return self.forward(x, context=context, transformer_options=transformer_options)
        context = routes.layer_context(self.call.layer, uuids, context)
        self.call.open(routes, uuids, x.shape[0], x)
        try:
            return self.forward(x, context=context, transformer_options=transformer_options)
        finally:
            self.call.close()


class RoutingWrapper:
    """WrappersMP.OUTER_SAMPLE: once per sampling run, the adapter's task weights for every cond of the guider."""

    def __init__(self, adapter: LibraryAdapter, num_layers: int):
        self.adapter, self.num_layers = adapter, num_layers

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        routes = options.setdefault(ROUTES_KEY, SamplingRoutes())
        routes.static_weights = weights_fixed_for_run(guider.model_patcher)
        conds = [CondEntry(cond["uuid"], kind, cond.get(PROMPT_KEY), cond.get("cross_attn"), spatial(kind, cond))
                 for kind, entries in guider.conds.items() for cond in entries or []]
        routes.add_conds(conds)
        routes.weights[self.adapter.key] = route_conds(self.adapter.router, conds, self.adapter.multipliers,
                                                       self.num_layers, self.adapter.uncond)
        return executor(*args, **kwargs)


def spatial(kind: str, cond: dict) -> bool:
    """Whether a guider's cond acts on part of the canvas only: a Context-Controlled region's prompt, or a cond
    with an area (ConditioningSetArea) or a mask (ConditioningSetMask); comfy/samplers.py:get_area_and_mult,
    v0.3.75, applies those keys."""
    return kind.startswith(REGION_PREFIX) or cond.get("area") is not None or cond.get("mask") is not None


def _unwrapped(patcher, key: str):
    """The host's own forward at `key`, under any CIDM patch of this or an earlier sampling run."""
    current = patcher.get_model_object(key)
    return current.forward if isinstance(current, (RoutedTransformerBlock, LoRAProjection)) else current


def add_library_patch(model, banks: dict[int, LayerLoRABank], router: CondRouter, multipliers: torch.Tensor,
                      uncond: str):
    """A clone of `model` that also applies this library's LoRAs, routed per cond; the libraries of earlier
    Elastic Aggregate nodes on `model` keep applying."""
    patched = model.clone()
    adapter = LibraryAdapter(banks, router, multipliers, uncond)
    layers = cross_attention_layers(unet_of(model))
    for layer in layers:
        block_key = f"{UNET_PREFIX}{layer.path.rsplit('.', 1)[0]}.forward"
        earlier = patched.object_patches.get(block_key)
        adapters = (earlier.call.adapters if isinstance(earlier, RoutedTransformerBlock) else ()) + (adapter,)
        call = LayerCall(layer.index, adapters)
        patched.add_object_patch(block_key, RoutedTransformerBlock(_unwrapped(patched, block_key), call))
        for proj in PROJECTIONS:
            key = f"{UNET_PREFIX}{layer.path}.{proj}.forward"
            patched.add_object_patch(key, LoRAProjection(_unwrapped(patched, key), proj, call))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ROUTING_WRAPPER_KEY,
                                 RoutingWrapper(adapter, len(layers)))
    return patched
