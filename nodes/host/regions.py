"""Region-aware cross-attention in ComfyUI: an attn2 object patch over whatever attn2 the model has (ComfyUI's own
CrossAttention, or the pack's ConceptCrossAttention from Elastic Aggregate LoRAs), on a clone of the MODEL.

The sampling run's RegionPlan rides in `transformer_options` (set by the guider for its own calls only); the rows
of a UNet batch are matched to conds by ComfyUI's per-cond `uuids` (comfy/samplers.py:_calc_cond_batch, v0.3.75),
so the plan survives however ComfyUI batches cond and uncond. Without a plan for the batch the patch calls the
wrapped module unchanged."""

from __future__ import annotations

import torch
from comfy.ldm.modules.attention import optimized_attention

from ...cidm.adapters import ConceptCrossAttention, LayerLoRABank, select_layer_context
from ...cidm.layers import cross_attention_layers
from ...cidm.regions import RegionPlan, region_cross_attention
from .model import UNET_PREFIX, unet_of

PLAN_KEY = "cidm_region_plan"


class RegionCrossAttention(torch.nn.Module):
    """Wraps one attn2. The wrapped module's projections are re-exposed under their own names (so stock LoRA weight
    patches still find them) and the module itself is kept unregistered."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        for name, child in inner.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "inner", inner)
        self.heads = inner.heads
        concepts = isinstance(inner, ConceptCrossAttention)
        object.__setattr__(self, "bank", inner.bank if concepts else LayerLoRABank([], 1.0))

    def layer_context(self, context: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        if isinstance(inner, ConceptCrossAttention):
            return select_layer_context(context, inner.layer.index, inner.num_layers, inner.tokens_per_layer)
        return context

    def route(self, context: torch.Tensor, cond_or_uncond=None) -> torch.Tensor | None:
        if not self.bank.num_tasks:
            return None
        return self.inner.router(self.inner.layer.index, context, cond_or_uncond)

    def attend(self, q, k, v, heads, transformer_options=None):
        return optimized_attention(q, k, v, heads, attn_precision=getattr(self.inner, "attn_precision", None),
                                   transformer_options=transformer_options or {})

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        plan: RegionPlan | None = transformer_options.get(PLAN_KEY)
        ids = transformer_options.get("uuids")
        if plan is None or context is None or value is not None or mask is not None or not plan.applies_to(ids):
            return self.inner(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        contexts = self.layer_context(context)
        weights = self.route(contexts, transformer_options.get("cond_or_uncond"))
        size = tuple(transformer_options["activations_shape"][-2:])
        rows = plan.rows(ids, contexts, weights, size, self.layer_context, self.route)
        return region_cross_attention(self, x, rows, self.attend, transformer_options=transformer_options)


def with_region_attention(model):
    """A clone of `model` whose every attn2 is wrapped in RegionCrossAttention."""
    patched = model.clone()
    for layer in cross_attention_layers(unet_of(patched)):
        path = UNET_PREFIX + layer.path
        patched.add_object_patch(path, RegionCrossAttention(patched.get_model_object(path)))
    return patched
