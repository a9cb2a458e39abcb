"""The ComfyUI side of the pack: adapters from ComfyUI objects (ModelPatcher, CLIP, VAE) to the cidm protocols.

One module per concern, each the only ComfyUI-aware code for it; every method decision lives in cidm/:
- `model`: what a MODEL is (its UNet, cross-attention layers, base-model fingerprint) and whether the pack supports it;
- `attention`: the attn2 patch (ComfyUI's attention kernels around cidm's ConceptCrossAttention), on a clone;
- `regions`: region-aware cross-attention, an attn2 patch over the stock or the pack's attn2, on a clone;
- `denoiser`: the cidm.train Denoiser over a ComfyUI model (training and its previews);
- `text_encoder`: cidm's LayerwiseTextEncoder over a ComfyUI CLIP.

Not named `comfy` so it never shadows ComfyUI's own package.
"""
