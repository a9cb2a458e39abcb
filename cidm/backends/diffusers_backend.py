"""The diffusers backend: the cidm.train Denoiser and LayerwiseTextEncoder over a UNet2DConditionModel, a
noise scheduler and a CLIP-style text encoder. Used for library work outside ComfyUI and by the toy world."""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..adapters import ConceptCrossAttention, LayerLoRABank
from ..errors import CIDMInputError
from ..layers import cross_attention_layers, get_submodule
from ..tokens import TOKEN_PATTERN

SENTINEL_WORDS = ("sks", "xqz", "zwx", "qxv")


class CIDMAttnProcessor:
    """A diffusers attention processor that runs attn2 through ConceptCrossAttention (one instance per layer)."""

    def __init__(self, attention: nn.Module, layer, bank: LayerLoRABank, router, num_layers: int,
                 tokens_per_layer: int):
        self.concept_attention = ConceptCrossAttention(attention, layer, bank, router, num_layers, tokens_per_layer)

    # diffusers passes a processor only the keyword arguments its signature names, so cond_or_uncond is explicit.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, cond_or_uncond=None,
                 **kwargs):
        out = self.concept_attention.forward_layer(hidden_states, encoder_hidden_states,
                                                   cond_or_uncond=cond_or_uncond)
        return out / attn.rescale_output_factor


class LabelIgnoringProcessor:
    """Every other attention module while concepts are adapted: it names cond_or_uncond (meant for the concept
    layers) so that diffusers does not warn on every call, and runs the module's own processor without it."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, cond_or_uncond=None,
                 **kwargs):
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class DiffusersDenoiser:
    """Trains in the scheduler's own parameterisation (epsilon or v_prediction). `vae=None` means the UNet works on
    images directly (pixel space, as the toy world does); then `to_model_space` maps IMAGE tensors in."""

    def __init__(self, unet: nn.Module, scheduler, vae=None, latent_scale: float = 0.18215,
                 to_model_space=None, tokens_per_layer: int = 77):
        """`unet`: a UNet2DConditionModel; `scheduler`: a diffusers noise scheduler; `vae`: None for pixel space.

        Raises:
            CIDMInputError: ("scheduler") when its prediction type is not epsilon or v_prediction; ("model") when
                the UNet has no cross-attention layers.
        """
        self.unet, self.scheduler, self.vae, self.latent_scale = unet, scheduler, vae, latent_scale
        self.tokens_per_layer = tokens_per_layer
        self.to_model_space = to_model_space or (lambda images: images.permute(0, 3, 1, 2) * 2 - 1)
        self.layers = cross_attention_layers(unet)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise CIDMInputError("scheduler", f"prediction type {self.prediction_type!r} is not supported")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.to_model_space(images.to(self.device))
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels).latent_dist.sample() * self.latent_scale

    def sample_noise_level(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def add_noise(self, latents, noise, level):
        return self.scheduler.add_noise(latents, noise, level.to(latents.device))

    def predict(self, noisy, level, context, cond_or_uncond: list[int] | None = None):
        """`cond_or_uncond` labels the batch's chunks (0 cond, 1 uncond) for routers that match uncond to cond."""
        extra = {"cross_attention_kwargs": {"cond_or_uncond": cond_or_uncond}} if cond_or_uncond else {}
        return self.unet(noisy, level, encoder_hidden_states=context, **extra).sample

    def target(self, latents, noise, level, noisy):
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, level.to(latents.device))

    @contextlib.contextmanager
    def adapted(self, banks, router):
        concept_layers = {layer.path: layer for layer in self.layers}
        originals = {}
        try:
            for path, attention in self.unet.named_modules():
                if not isinstance(attention, Attention):
                    continue
                originals[path] = attention.processor
                layer = concept_layers.get(path)
                attention.set_processor(
                    CIDMAttnProcessor(attention, layer, banks[layer.index], router, len(self.layers),
                                      self.tokens_per_layer) if layer else LabelIgnoringProcessor(attention.processor))
            yield
        finally:
            for path, processor in originals.items():
                get_submodule(self.unet, path).set_processor(processor)


class DiffusersLayerwiseEncoder:
    """Encodes a prompt once per layer; concept tokens become a single-token placeholder whose input embedding is
    swapped for the token's layer embedding (differentiably) by a hook on the embedding table."""

    def __init__(self, tokenizer, text_encoder: nn.Module, num_layers: int):
        self.tokenizer, self.text_encoder, self.num_layers = tokenizer, text_encoder, num_layers
        self.tokens_per_layer = tokenizer.model_max_length
        self.table = text_encoder.get_input_embeddings()

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, padding="max_length", max_length=self.tokens_per_layer, truncation=True,
                              return_tensors="pt").input_ids[0]

    def _single_token(self, word: str) -> int | None:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        return ids[0] if len(ids) == 1 else None

    def word_embedding(self, word: str) -> torch.Tensor | None:
        token = self._single_token(word)
        return None if token is None else self.table.weight[token].detach().float().clone()

    def encode(self, text: str, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, T, D]: `text` encoded once per layer l, every token of `embeddings` ([L, D] each) at its layer-l
        embedding.

        Raises:
            CIDMInputError: ("text") when every placeholder word already occurs in the prompt, or when the concept
                tokens do not all fit in the tokenizer's length.
        """
        occurrences = [t for t in TOKEN_PATTERN.findall(text) if t in embeddings]
        word = next((w for w in SENTINEL_WORDS if w not in text.lower() and self._single_token(w) is not None), None)
        if word is None:
            raise CIDMInputError("text", f"no placeholder word of {SENTINEL_WORDS} is free in this prompt")
        ids = self._ids(TOKEN_PATTERN.sub(lambda m: word if m.group(0) in embeddings else m.group(0), text))
        positions = (ids == self._single_token(word)).nonzero().flatten().tolist()
        if len(positions) != len(occurrences):
            raise CIDMInputError("text", "the concept tokens did not fit in the prompt length; shorten the prompt")
        device = self.table.weight.device
        outputs = []
        for layer in range(self.num_layers):
            replacement = [embeddings[token][layer] for token in occurrences]

            def swap(module, inputs, output, replacement=replacement):
                output = output.clone()
                for position, vector in zip(positions, replacement):
                    output[:, position] = vector.to(output)
                return output

            handle = self.table.register_forward_hook(swap)
            try:
                outputs.append(self.text_encoder(ids[None].to(device)).last_hidden_state[0])
            finally:
                handle.remove()
        return torch.stack(outputs)
