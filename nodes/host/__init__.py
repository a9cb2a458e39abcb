"""The ComfyUI side of the pack: adapters from ComfyUI objects (ModelPatcher, CLIP, VAE) to the cidm protocols.

One module per concern, each the only ComfyUI-aware code for it; every method decision lives in cidm/:
- `model`: what a MODEL is (its UNet, cross-attention layers, base-model fingerprint) and whether the pack supports it;
- `attention`: the concept LoRAs in every attn2's projections, routed per cond through ComfyUI's batching
  (cidm/routing.py), for sampling; the trainable ConceptCrossAttention for training; both on clones;
- `regions`: region-aware cross-attention, an attn2 patch that mixes the routed concepts per region, on a clone;
- `denoiser`: the cidm.train Denoiser over a ComfyUI model (training and its previews);
- `text_encoder`: cidm's LayerwiseTextEncoder over a ComfyUI CLIP.

Not named `comfy` so it never shadows ComfyUI's own package.
"""
