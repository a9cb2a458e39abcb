"""Region-aware cross-attention in ComfyUI: an attn2 object patch over the model's attn2 (ComfyUI's own
CrossAttention, whose projections Elastic Aggregate LoRAs may have patched), on a clone of the MODEL.

The sampling run's RegionPlan rides in `transformer_options` (set by the guider for its own calls only); the rows
of a UNet batch are matched to conds by ComfyUI's per-cond `uuids` (comfy/samplers.py:_calc_cond_batch, v0.3.75),
so the plan survives however ComfyUI batches cond and uncond. The concepts come from the routing transport of
`nodes/host/attention.py` (cidm/routing.py): each cond's layer context and task weights, looked up by its uuid, and
the layer's LoRA bank, which this patch mixes per token and region while the projections' own LoRA is suspended.
Without a plan for the batch the patch calls the wrapped module unchanged.

During the probe steps of automatic regions (cidm/auto_regions.py), a `HostProbe` rides in `transformer_options`
too: before attending, the patch shows it the positive prompt's rows of every layer whose grid it wants."""

from __future__ import annotations

import contextlib

import torch
from comfy.ldm.modules.attention import optimized_attention

from ...cidm.adapters import LayerLoRABank
from ...cidm.auto_regions import AttentionProbe
from ...cidm.layers import cross_attention_layers
from ...cidm.regions import RegionPlan, prepare_region_attention, region_cross_attention, with_projected_contexts
from .attention import layer_call
from .model import UNET_PREFIX, unet_of

PLAN_KEY = "cidm_region_plan"
PROBE_KEY = "cidm_region_probe"
NO_CONCEPTS = LayerLoRABank([], 1.0)


class RegionCrossAttention(torch.nn.Module):
    """Wraps one attn2. The wrapped module's projections are re-exposed under their own names (so stock LoRA weight
    patches still find them) and the module itself is kept unregistered."""

    def __init__(self, inner: torch.nn.Module, layer: int):
        super().__init__()
        self.layer = layer
        for name, child in inner.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "inner", inner)
        self.heads = inner.heads

    def attend(self, q, k, v, heads, transformer_options=None):
        return optimized_attention(q, k, v, heads, attn_precision=getattr(self.inner, "attn_precision", None),
                                   transformer_options=transformer_options or {})

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        plan: RegionPlan | None = transformer_options.get(PLAN_KEY)
        ids = transformer_options.get("uuids")
        probe: HostProbe | None = transformer_options.get(PROBE_KEY)
        if probe is not None and context is not None:
            probe.observe(self, x, context, ids, tuple(transformer_options["activations_shape"][-2:]))
        if plan is None or context is None or value is not None or mask is not None or not plan.applies_to(ids):
            return self.inner(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        call = layer_call(self)
        concepts = call is not None and call.routes is not None
        bank = call.bank if concepts else NO_CONCEPTS
        size = tuple(transformer_options["activations_shape"][-2:])

        def prepare():
            if concepts:
                rows = plan.rows(ids, context, call.row_weights(), size,
                                 lambda region, region_id: call.cond_context(region_id, region),
                                 lambda _, region_id: call.cond_weights(region_id)[None])
            else:
                rows = plan.rows(ids, context, None, size, lambda region, _: region, lambda *_: None)
            return prepare_region_attention(rows, bank.num_tasks, x)

        # The same conds give the same inputs in every step: made once per sampling run (RunCache), so a step
        # copies nothing to the device and reads nothing back; with fixed weights, K and V are made once too.
        owner = call.routes if concepts else plan
        with call.lora_suspended() if concepts else contextlib.nullcontext():
            def made():
                inputs = prepare()
                return with_projected_contexts(inputs, self, bank) if owner.static_weights else inputs
            inputs = owner.cached(("region attention", self.layer, tuple(ids), x.shape[0], size, x.device, x.dtype),
                                  made)
            return region_cross_attention(self, bank, x, inputs, self.attend, transformer_options=transformer_options)


class HostProbe:
    """An AttentionProbe (cidm.auto_regions) fed by RegionCrossAttention during the probe steps of a sampling run:
    the rows of the positive prompt's cond (`cond_ids`, ComfyUI's cond uuids), one per latent of the batch, in
    every attn2 layer whose grid the probe wants. q and k are the layer's own projections, with the CIDM LoRAs the
    open LayerCall applies (nodes/host/attention.py) and the layer context the block put in place."""

    def __init__(self, probe: AttentionProbe, cond_ids):
        self.probe, self.cond_ids = probe, set(cond_ids)

    def observe(self, module, x: torch.Tensor, context: torch.Tensor, ids, size: tuple[int, int]) -> None:
        if not ids or not self.probe.wants(size):
            return
        per_chunk = x.shape[0] // len(ids)
        rows = [chunk * per_chunk + row for chunk, uid in enumerate(ids) if uid in self.cond_ids
                for row in range(per_chunk)]
        if rows:
            self.probe.observe(module.to_q(x)[rows], module.to_k(context)[rows], module.heads)


def with_region_attention(model):
    """A clone of `model` whose every attn2 is wrapped in RegionCrossAttention."""
    patched = model.clone()
    for layer in cross_attention_layers(unet_of(patched)):
        path = UNET_PREFIX + layer.path
        patched.add_object_patch(path, RegionCrossAttention(patched.get_model_object(path), layer.index))
    return patched
