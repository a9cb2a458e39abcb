"""The attn2 patch: every cross-attention layer of a clone of the MODEL becomes a cidm ConceptCrossAttention that
runs ComfyUI's attention kernels. Installed as ModelPatcher object patches, so the shared model is never mutated."""

from __future__ import annotations

from comfy.ldm.modules.attention import optimized_attention, optimized_attention_masked

from ...cidm.adapters import ConceptCrossAttention, LayerLoRABank
from ...cidm.layers import cross_attention_layers
from .model import UNET_PREFIX, unet_of
from .text_encoder import TOKENS_PER_LAYER


class ComfyCrossAttention(ConceptCrossAttention):
    """ConceptCrossAttention with ComfyUI's attn2 call signature and attention kernels."""

    def __init__(self, original, layer, bank, router, num_layers):
        super().__init__(original, layer, bank, router, num_layers, TOKENS_PER_LAYER, attention=self._attend)

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


def object_patch_attn2(model, banks: dict[int, LayerLoRABank], router):
    """A clone of `model` whose attn2 modules are ConceptCrossAttention wrappers (original weights re-exposed, so
    stock LoRA weight patches still apply)."""
    patched = model.clone()
    layers = cross_attention_layers(unet_of(model))
    for layer in layers:
        original = patched.get_model_object(UNET_PREFIX + layer.path)
        wrapper = ComfyCrossAttention(original, layer, banks[layer.index], router, len(layers))
        patched.add_object_patch(UNET_PREFIX + layer.path, wrapper)
    return patched
