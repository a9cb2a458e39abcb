"""The diffusers backend: the cidm.train Denoiser and LayerwiseTextEncoder over a UNet2DConditionModel, a
noise scheduler and a CLIP-style text encoder. Used for library work outside ComfyUI and by the toy world."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..adapters import ConceptCrossAttention, LayerLoRABank, scaled_dot_product_heads, select_layer_context
from ..auto_regions import AttentionProbe
from ..errors import CIDMInputError
from ..layers import cross_attention_layers, get_submodule
from ..regions import RegionMasks, prepare_region_attention, region_cross_attention, row_branches
from ..tokens import TOKEN_PATTERN, check_token_slots, layers_from_slots

SENTINEL_WORDS = ("sks", "xqz", "zwx", "qxv")


class ProbingAttention:
    """scaled_dot_product_heads that first shows the first `rows` rows of a probed layer (those whose image token
    count is the probe grid's) to an AttentionProbe (cidm.auto_regions)."""

    def __init__(self, probe: AttentionProbe, rows: int):
        self.probe, self.rows = probe, rows

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        if q.shape[1] == self.probe.grid[0] * self.probe.grid[1]:
            self.probe.observe(q[:self.rows], k[:self.rows], heads)
        return scaled_dot_product_heads(q, k, v, heads)


class CIDMAttnProcessor:
    """A diffusers attention processor that runs attn2 through ConceptCrossAttention (one instance per layer)."""

    def __init__(self, attention: nn.Module, layer, bank: LayerLoRABank, router, num_layers: int,
                 tokens_per_layer: int, probe: ProbingAttention | None = None):
        self.concept_attention = ConceptCrossAttention(attention, layer, bank, router, num_layers, tokens_per_layer,
                                                       attention=probe or scaled_dot_product_heads)

    # diffusers passes a processor only the keyword arguments its signature names, so cond_or_uncond is explicit.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, cond_or_uncond=None,
                 **kwargs):
        out = self.concept_attention.forward_layer(hidden_states, encoder_hidden_states,
                                                   cond_or_uncond=cond_or_uncond)
        return out / attn.rescale_output_factor


@dataclass
class RegionBatch(RegionMasks):
    """The regions of every row of one UNet batch of B rows, for region-aware cross-attention
    (cidm.regions.region_cross_attention) in a diffusers UNet.

    masks: U canvas masks [H, W] in [0, 1] (any resolution; shares per attention resolution by region_weights).
    contexts: U tensors [B, L·T, D]: region u's packed layer contexts for each row (what a row's region attends to).
    weights: U tensors [B, L, K]: region u's task weights for each row, per layer (None entries when the UNet has no
        concept LoRAs).
    mirror: B flags: a mirror row (the negative of classifier-free guidance) keeps its own context in every region
        but takes the region's concepts, so guidance sees the prompt difference only.
    latent_size: (H, W) of the UNet input, from which each layer's attention grid is derived.
    One RegionBatch serves one sampling run: what the attention layers derive from it is cached (RunCache)."""

    masks: list[torch.Tensor]
    contexts: list[torch.Tensor]
    weights: list[torch.Tensor | None]
    mirror: list[bool]
    latent_size: tuple[int, int]

    def grid(self, tokens: int) -> tuple[int, int]:
        """(h, w) of an attention layer with `tokens` image tokens (the UNet halves both sides per level).

        Raises:
            CIDMInputError: ("latent") when no power-of-two downscale of the latent size has that many tokens.
        """
        height, width = self.latent_size
        factor = round(math.sqrt(height * width / tokens))
        if factor < 1 or height % factor or width % factor or (height // factor) * (width // factor) != tokens:
            raise CIDMInputError("latent", f"a {height}×{width} latent has no attention grid of {tokens} tokens")
        return height // factor, width // factor


class CIDMRegionAttnProcessor:
    """A diffusers attention processor for attn2 that runs region-aware cross-attention: each image token attends
    to its regions' layer contexts through only their concepts' LoRAs, outside every region to the row's own
    prompt under the router's weights (one instance per layer; the regions ride in a RegionBatch)."""

    def __init__(self, attention: nn.Module, layer, bank: LayerLoRABank, router, num_layers: int,
                 tokens_per_layer: int, regions: RegionBatch):
        self.concept_attention = ConceptCrossAttention(attention, layer, bank, router, num_layers, tokens_per_layer)
        self.regions = regions

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, cond_or_uncond=None,
                 **kwargs):
        module = self.concept_attention
        index, count, per_layer = module.layer.index, module.num_layers, module.tokens_per_layer

        def prepare():
            concepts = module.bank.num_tasks > 0
            context = select_layer_context(encoder_hidden_states, index, count, per_layer)
            weights = module.router(index, context, cond_or_uncond) if concepts else None
            region_contexts = [select_layer_context(c, index, count, per_layer) for c in self.regions.contexts]
            region_weights_ = [w[:, index] if concepts else None for w in self.regions.weights]
            shares = self.regions.shares(*self.regions.grid(hidden_states.shape[1])).to(hidden_states)
            rows = [row_branches(context[row], None if weights is None else weights[row], shares,
                                 [(None if self.regions.mirror[row] else c[row], None if w is None else w[row])
                                  for c, w in zip(region_contexts, region_weights_)])
                    for row in range(hidden_states.shape[0])]
            return prepare_region_attention(rows, module.bank.num_tasks, hidden_states)

        # The batch's prompts are the same in every step of the run that owns this RegionBatch.
        inputs = self.regions.cached(("region attention", index, *hidden_states.shape[:2], hidden_states.device,
                                      hidden_states.dtype), prepare)
        out = region_cross_attention(module, module.bank, hidden_states, inputs, scaled_dot_product_heads)
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
        self.pooled_width = 0  # SD1.x-layout UNets: no pooled text or size conditioning (no ADM input)
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

    def predict(self, noisy, level, context, cond_or_uncond: list[int] | None = None, *, extra: None = None):
        """`cond_or_uncond` labels the batch's chunks (0 cond, 1 uncond) for routers that match uncond to cond;
        `extra` is always None here (pooled_width 0, cidm.train.Denoiser)."""
        extra = {"cross_attention_kwargs": {"cond_or_uncond": cond_or_uncond}} if cond_or_uncond else {}
        return self.unet(noisy, level, encoder_hidden_states=context, **extra).sample

    def target(self, latents, noise, level, noisy):
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, level.to(latents.device))

    @contextlib.contextmanager
    def adapted(self, banks, router, regions: RegionBatch | None = None, probe: AttentionProbe | None = None,
                probe_rows: int = 0):
        """Every attn2 runs the layer's LoRA bank (`banks[layer index]`) under `router`; with `regions`,
        region-aware cross-attention (CIDMRegionAttnProcessor) instead; with `probe` (and no regions), the first
        `probe_rows` rows of every batch (the positive prompts) are shown to it (ProbingAttention). The UNet's own
        processors come back on exit."""
        concept_layers = {layer.path: layer for layer in self.layers}
        originals = {}
        try:
            for path, attention in self.unet.named_modules():
                if not isinstance(attention, Attention):
                    continue
                originals[path] = attention.processor
                layer = concept_layers.get(path)
                if layer is None:
                    attention.set_processor(LabelIgnoringProcessor(attention.processor))
                    continue
                arguments = (attention, layer, banks[layer.index], router, len(self.layers), self.tokens_per_layer)
                probing = ProbingAttention(probe, probe_rows) if probe is not None else None
                attention.set_processor(CIDMAttnProcessor(*arguments, probing) if regions is None
                                        else CIDMRegionAttnProcessor(*arguments, regions))
            yield
        finally:
            for path, processor in originals.items():
                get_submodule(self.unet, path).set_processor(processor)


class DiffusersLayerwiseEncoder:
    """Encodes a prompt for every token slot in one text-encoder batch (a row per slot); concept tokens become a
    single-token placeholder whose input embedding is swapped for the token's slot embedding (differentiably) by a
    hook on the embedding table. Layer l reads its slot's row (cidm.tokens)."""

    def __init__(self, tokenizer, text_encoder: nn.Module, num_layers: int, token_slots: list[int] | None = None):
        """`token_slots`: the token slot of each layer (cidm.tokens.check_token_slots); None, one per layer."""
        self.tokenizer, self.text_encoder, self.num_layers = tokenizer, text_encoder, num_layers
        self.token_slots = check_token_slots(token_slots, num_layers, "token_slots")
        self.num_slots = max(self.token_slots) + 1
        self.tokens_per_layer = tokenizer.model_max_length
        self.table = text_encoder.get_input_embeddings()
        self.norm_width = self.table.weight.shape[1]

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, padding="max_length", max_length=self.tokens_per_layer, truncation=True,
                              return_tensors="pt").input_ids[0]

    def _single_token(self, word: str) -> int | None:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        return ids[0] if len(ids) == 1 else None

    def word_embedding(self, word: str) -> torch.Tensor | None:
        token = self._single_token(word)
        return None if token is None else self.table.weight[token].detach().float().clone()

    def placeholder_ids(self, text: str, embeddings: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """(token ids [T] of `text` with every concept token of `embeddings` replaced by a placeholder word, the
        placeholders' positions, one per concept-token occurrence in order).

        Raises:
            CIDMInputError: ("text") as `encode` does.
        """
        occurrences = [t for t in TOKEN_PATTERN.findall(text) if t in embeddings]
        word = next((w for w in SENTINEL_WORDS if w not in text.lower() and self._single_token(w) is not None), None)
        if word is None:
            raise CIDMInputError("text", f"no placeholder word of {SENTINEL_WORDS} is free in this prompt")
        ids = self._ids(TOKEN_PATTERN.sub(lambda m: word if m.group(0) in embeddings else m.group(0), text))
        positions = (ids == self._single_token(word)).nonzero().flatten().tolist()
        if len(positions) != len(occurrences):
            raise CIDMInputError("text", "the concept tokens did not fit in the prompt length; shorten the prompt")
        return ids, positions

    def token_positions(self, text: str, embeddings: dict[str, torch.Tensor]) -> list[int]:
        """Where each occurrence of a concept token of `embeddings` in `text` sits in the encoded context [T]."""
        return self.placeholder_ids(text, embeddings)[1]

    def encode(self, text: str, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, T, D]: `text` encoded once per token slot s, every token of `embeddings` ([S, D] each) at its slot-s
        embedding; layer l gets its slot's encoding.

        Raises:
            CIDMInputError: ("text") when every placeholder word already occurs in the prompt, or when the concept
                tokens do not all fit in the tokenizer's length.
        """
        occurrences = [t for t in TOKEN_PATTERN.findall(text) if t in embeddings]
        ids, positions = self.placeholder_ids(text, embeddings)
        device = self.table.weight.device
        if not occurrences:  # every layer reads the same encoding
            return self.text_encoder(ids[None].to(device)).last_hidden_state.expand(self.num_layers, -1, -1)
        replacement = torch.stack([embeddings[token] for token in occurrences], dim=1)  # [S, occurrences, D]

        def swap(module, inputs, output):  # batch row s is slot s: the placeholders take their slot-s vectors
            output = output.clone()
            output[:, positions] = replacement.to(output)
            return output

        # one text-encoder call with a batch row per slot, as ComfyUI's encoder does (nodes/host/text_encoder.py)
        handle = self.table.register_forward_hook(swap)
        try:
            encoded = self.text_encoder(ids[None].expand(self.num_slots, -1).to(device)).last_hidden_state
        finally:
            handle.remove()
        return layers_from_slots(encoded, self.token_slots)
