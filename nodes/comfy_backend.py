"""Adapters from ComfyUI objects (ModelPatcher, CLIP, VAE) to the cidm protocols. The only ComfyUI-aware code
besides the node schemas; every method decision lives in cidm/."""

from __future__ import annotations

import contextlib
import logging

import torch

import comfy.model_management
import comfy.samplers
from comfy.ldm.modules.attention import optimized_attention, optimized_attention_masked

from ..cidm.adapters import ConceptCrossAttention, LayerLoRABank
from ..cidm.errors import CIDMInputError
from ..cidm.layers import CrossAttentionLayer, base_model_fingerprint, cross_attention_layers, get_submodule
from ..cidm.tokens import TOKEN_PATTERN

TOKENS_PER_LAYER = 77
UNET_PREFIX = "diffusion_model."
# Single-BPE words used as placeholders for concept tokens while tokenizing; the first one absent from the prompt
# is used, so a user's own words are never mistaken for a concept token.
SENTINEL_WORDS = ("sks", "xqz", "zwx", "qxv")


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


def unet_of(model) -> torch.nn.Module:
    return model.model.diffusion_model


def model_layers(model) -> list[CrossAttentionLayer]:
    if getattr(model.model, "latent_format", None) is None or not hasattr(model.model, "diffusion_model"):
        raise CIDMInputError("model", "not a UNet diffusion model; supported: SD1.5-layout checkpoints")
    layers = cross_attention_layers(unet_of(model))
    context_dims = {layer.context_dim for layer in layers}
    if context_dims != {768}:
        raise CIDMInputError("model", f"cross-attention context size {sorted(context_dims)} is not SD1.5's 768; "
                                      "supported: SD1.5-layout checkpoints (SD1.x and fine-tunes of it)")
    return layers


def model_fingerprint(model) -> str:
    unet = unet_of(model)
    return base_model_fingerprint(lambda key: get_submodule(unet, key.rsplit(".", 1)[0]).weight,
                                  len(cross_attention_layers(unet)))


def base_model_info(model) -> dict:
    layers = model_layers(model)
    return {"fingerprint": model_fingerprint(model), "num_layers": len(layers), "context_dim": 768,
            "layer_paths": [layer.path for layer in layers], "model_type": type(model.model).__name__}


def object_patch_attn2(model, banks: dict[int, LayerLoRABank], router):
    """A clone of `model` whose attn2 modules are ConceptCrossAttention wrappers (original weights re-exposed, so
    stock LoRA weight patches still apply)."""
    patched = model.clone()
    unet = unet_of(model)
    layers = cross_attention_layers(unet)
    for layer in layers:
        original = get_submodule(unet, layer.path)
        wrapper = ComfyCrossAttention(original, layer, banks[layer.index], router, len(layers))
        patched.add_object_patch(UNET_PREFIX + layer.path, wrapper)
    return patched


def _detach_from_inference_mode(module: torch.nn.Module) -> None:
    """ComfyUI loads weights under torch.inference_mode; autograd cannot save such tensors for backward, so the
    frozen weights are re-materialised as ordinary tensors (same values) before training."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_inference():  # replacing .data keeps the Parameter itself an inference tensor
            setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.is_inference():
            setattr(module, name, buffer.clone())
    for child in module.children():
        _detach_from_inference_mode(child)


class ComfyDenoiser:
    """The cidm.train Denoiser protocol over a ComfyUI model, honouring its model_sampling (eps, v, ...)."""

    def __init__(self, model, vae, gradient_checkpointing: bool = False):
        self.patcher = model.clone()
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.sampling = self.base.model_sampling
        self.vae = vae
        self.layers = model_layers(model)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def device(self) -> torch.device:
        return comfy.model_management.get_torch_device()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(self.vae.encode(images[:, :, :, :3])).float()

    def sample_noise_level(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        timesteps = torch.randint(0, 1000, (batch,), generator=generator).float()
        return self.sampling.sigma(timesteps)

    def add_noise(self, latents, noise, level):
        return self.sampling.noise_scaling(level, noise, latents)

    def predict(self, noisy, level, context):
        dtype = self.base.get_dtype()
        model_input = self.sampling.calculate_input(level, noisy).to(dtype)
        timestep = self.sampling.timestep(level).float()
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=noisy.device.type == "cuda"):
            return self.unet(model_input, timestep, context=context.to(dtype), transformer_options={}).float()

    def target(self, latents, noise, level, noisy):
        # calculate_denoised is affine in the model output: denoised = a − b·out. The output that denoises to the
        # clean latents is (a − latents) / b, whatever the parameterisation.
        at_zero = self.sampling.calculate_denoised(level, torch.zeros_like(noisy), noisy)
        at_one = self.sampling.calculate_denoised(level, torch.ones_like(noisy), noisy)
        return (at_zero - latents) / (at_zero - at_one)

    @torch.no_grad()
    def sample(self, contexts: torch.Tensor, latent_shape: tuple[int, ...], steps: int, cfg: float,
               generator: torch.Generator) -> torch.Tensor:
        """Euler sampling with classifier-free guidance over packed contexts [cond, uncond] -> IMAGE [1, H, W, 3].
        Used for training previews, inside `adapted`, so the sample shows the weights as they are now."""
        sigmas = comfy.samplers.calculate_sigmas(self.sampling, "normal", steps).to(self.device)
        noise = torch.randn(latent_shape, generator=generator).to(self.device)
        x = self.sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            level = sigma.repeat(2)
            batch = x.repeat(2, 1, 1, 1)
            cond, uncond = self.sampling.calculate_denoised(level, self.predict(batch, level, contexts), batch)
            denoised = uncond + cfg * (cond - uncond)
            x = x + (x - denoised) / sigma * (next_sigma - sigma)
        latents = self.sampling.inverse_noise_scaling(sigmas[-1], x)
        return self.vae.decode(self.base.process_latent_out(latents))[:1]

    @contextlib.contextmanager
    def adapted(self, banks, router):
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        _detach_from_inference_mode(self.unet)
        self.unet.requires_grad_(False)
        originals = {}
        blocks = []
        try:
            for layer in self.layers:
                parent_path, name = layer.path.rsplit(".", 1)
                parent = get_submodule(self.unet, parent_path)
                originals[layer.path] = (parent, name, getattr(parent, name))
                wrapper = ComfyCrossAttention(originals[layer.path][2], layer, banks[layer.index], router,
                                              len(self.layers))
                setattr(parent, name, wrapper)
            if self.gradient_checkpointing:
                blocks = _checkpoint_blocks(self.unet)
            yield
        finally:
            for block in blocks:
                del block.forward
            for parent, name, original in originals.values():
                setattr(parent, name, original)


def _checkpoint_blocks(unet) -> list[torch.nn.Module]:
    """Recomputes each UNet block in the backward pass instead of storing its activations."""
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)
    return blocks


class ComfyLayerwiseEncoder:
    """cidm's LayerwiseTextEncoder over a ComfyUI CLIP: one encode per layer with the layer's token embeddings
    inserted as embedding tensors (ComfyUI's tokenizer accepts tensors in place of token ids)."""

    def __init__(self, clip, num_layers: int):
        self.clip = clip
        self.num_layers = num_layers
        self.tokens_per_layer = TOKENS_PER_LAYER
        self.text_model = self._text_model()

    def _text_model(self):
        encoder = self.clip.cond_stage_model
        for attribute in ("clip_l", "clip_g", "transformer"):
            candidate = getattr(encoder, attribute, None)
            if candidate is not None and hasattr(candidate, "transformer"):
                return candidate.transformer
        raise CIDMInputError("clip", "unsupported text encoder; supported: SD1.5's CLIP-L")

    def _token_ids(self, text: str) -> list[tuple]:
        tokenized = self.clip.tokenize(text)
        if len(tokenized) != 1:
            raise CIDMInputError("clip", "unsupported text encoder (more than one tokenizer); supported: SD1.5")
        chunks = next(iter(tokenized.values()))
        if len(chunks) > 1:
            logging.warning("CIDM: prompt longer than 75 tokens, truncated to the first 77-token chunk: %r", text)
        return chunks[0]

    def _sentinel(self, text: str) -> tuple[str, int]:
        for word in SENTINEL_WORDS:
            ids = [entry[0] for entry in self._token_ids(word)]
            if word not in text.lower() and isinstance(ids[1], int) and ids[2] == ids[-1]:
                return word, ids[1]
        raise CIDMInputError("text", f"the prompt uses every placeholder word {SENTINEL_WORDS}; rephrase it")

    def word_embedding(self, word: str) -> torch.Tensor | None:
        ids = [entry[0] for entry in self._token_ids(word)]
        body = [i for i in ids[1:] if i != ids[-1]]  # drop BOS and the EOS/padding run
        if len(body) != 1:
            return None
        table = self.text_model.get_input_embeddings().weight
        return table[body[0]].detach().float().clone()

    def encode_with_pooled(self, text: str, embeddings: dict[str, torch.Tensor]):
        """([L, 77, D], pooled) for a prompt whose concept tokens are keys of `embeddings` (token -> [L, D])."""
        occurrences = [t for t in TOKEN_PATTERN.findall(text) if t in embeddings]
        word, sentinel = self._sentinel(text)
        substituted = TOKEN_PATTERN.sub(lambda m: word if m.group(0) in embeddings else m.group(0), text)
        base = self._token_ids(substituted)
        positions = [i for i, entry in enumerate(base) if entry[0] == sentinel]
        if len(positions) != len(occurrences):
            raise CIDMInputError("text", "the concept tokens did not fit in the first 75 tokens; shorten the prompt")
        tokenizer_key = next(iter(self.clip.tokenize("")))
        chunks = []
        for layer in range(self.num_layers):
            tokens = list(base)
            for position, token in zip(positions, occurrences):
                tokens[position] = (embeddings[token][layer],) + tuple(base[position][1:])
            chunks.append(tokens)
        # ComfyUI encodes a prompt's 77-token chunks as one batch and joins them along the token axis, so one call
        # with a chunk per layer runs the text encoder once and returns the packed [1, L·77, D] layout.
        cond, pooled = self.clip.encode_from_tokens({tokenizer_key: chunks}, return_pooled=True)
        return cond[0].reshape(self.num_layers, TOKENS_PER_LAYER, -1), pooled

    def encode(self, text: str, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.encode_with_pooled(text, embeddings)[0]
        with _out_of_place_residuals(self.text_model):
            return self.encode_with_pooled(text, embeddings)[0]


def _residual_forward(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def _out_of_place_residuals(text_model: torch.nn.Module):
    """ComfyUI's CLIPLayer adds its residuals in place (x += ...), which autograd rejects once the token embeddings
    require grad. While training, each layer runs the same arithmetic out of place."""
    layers = [m for m in text_model.modules() if all(hasattr(m, a) for a in
                                                     ("self_attn", "layer_norm1", "mlp", "layer_norm2"))]
    for layer in layers:
        layer.forward = _residual_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
