"""The cidm.train Denoiser protocol over a ComfyUI model: training forward passes and preview sampling."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.samplers

from ...cidm.data import size_conditioning
from ...cidm.train import PooledConditioning
from .attention import ComfyCrossAttention
from .family import model_family
from .model import UNET_PREFIX, model_layers


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
    """The cidm.train Denoiser protocol over a ComfyUI model, honouring its model_sampling (eps, v, ...), including
    one that a node such as ModelSamplingDiscrete set on the MODEL as an object patch. A family with an ADM input
    (SDXL) takes the pooled text output and size conditioning as the UNet's `y` (`adm`)."""

    def __init__(self, model, vae, gradient_checkpointing: bool = False):
        self.model = model
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.sampling = model.get_model_object("model_sampling")
        self.vae = vae
        self.layers = model_layers(model)
        self.family = model_family(model)
        self.pooled_width = self.family.pooled_width if self.family.adm_channels else 0
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

    def adm(self, extra: PooledConditioning, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The UNet's `y` [B, adm_channels] for a latent batch of `latent_shape` [B, C, h, w]: per sample, the
        model's own `encode_adm` of its pooled output [P] and size conditioning (`cidm.data.size_conditioning`:
        original size and crop of its image, target = the latent's h·8 × w·8), every size given explicitly
        (encode_adm falls back to 768 px, comfy/model_base.py:469-492, v0.3.75). Differentiable in the pooled
        output."""
        return torch.cat([self.base.encode_adm(pooled_output=pooled[None], device=self.device,
                                               **size_conditioning(size, latent_shape))
                          for pooled, size in zip(extra.pooled, extra.sizes)])

    def predict(self, noisy, level, context, *, extra: PooledConditioning | None = None):
        dtype = self.base.get_dtype()
        model_input = self.sampling.calculate_input(level, noisy).to(dtype)
        timestep = self.sampling.timestep(level).float()
        conditioning = {"context": context.to(dtype)}
        if self.pooled_width:
            conditioning["y"] = self.adm(extra, tuple(noisy.shape)).to(noisy.device, dtype)
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=noisy.device.type == "cuda"):
            return self.unet(model_input, timestep, transformer_options={}, **conditioning).float()

    def target(self, latents, noise, level, noisy):
        # calculate_denoised is affine in the model output: denoised = a − b·out. The output that denoises to the
        # clean latents is (a − latents) / b, whatever the parameterisation.
        at_zero = self.sampling.calculate_denoised(level, torch.zeros_like(noisy), noisy)
        at_one = self.sampling.calculate_denoised(level, torch.ones_like(noisy), noisy)
        return (at_zero - latents) / (at_zero - at_one)

    @torch.no_grad()
    def sample(self, contexts: torch.Tensor, extra: PooledConditioning | None, latent_shape: tuple[int, ...],
               steps: int, cfg: float, generator: torch.Generator) -> torch.Tensor:
        """Euler sampling with classifier-free guidance over packed contexts [cond, uncond] (and their pooled
        conditioning, as `predict` takes it) -> IMAGE [1, H, W, 3]. Used for training previews, inside `adapted`,
        so the sample shows the weights as they are now."""
        sigmas = comfy.samplers.calculate_sigmas(self.sampling, "normal", steps).to(self.device)
        noise = torch.randn(latent_shape, generator=generator).to(self.device)
        x = self.sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            level = sigma.repeat(2)
            batch = x.repeat(2, 1, 1, 1)
            output = self.predict(batch, level, contexts, extra=extra)
            cond, uncond = self.sampling.calculate_denoised(level, output, batch)
            denoised = uncond + cfg * (cond - uncond)
            x = x + (x - denoised) / sigma * (next_sigma - sigma)
        latents = self.sampling.inverse_noise_scaling(sigmas[-1], x)
        return self.vae.decode(self.base.process_latent_out(latents))[:1]

    @contextlib.contextmanager
    def adapted(self, banks, router):
        """Trains through a clone of the model whose attn2 layers (and, with gradient checkpointing, UNet blocks'
        forwards) are ModelPatcher object patches, as `comfy_extras/nodes_train.py` patches a clone with
        `add_weight_wrapper`. The patches are applied when the clone loads and restored on exit; the shared
        model's modules are never replaced. Its frozen weights are re-materialised outside inference mode (same
        values): autograd needs them for backward."""
        patcher = self.model.clone()
        for layer in self.layers:
            original = patcher.get_model_object(UNET_PREFIX + layer.path)
            patcher.add_object_patch(UNET_PREFIX + layer.path,
                                     ComfyCrossAttention(original, layer, banks[layer.index], router,
                                                         len(self.layers), self.family.tokens_per_chunk))
        if self.gradient_checkpointing:
            for path, forward in _checkpointed_block_forwards(self.unet).items():
                patcher.add_object_patch(f"{UNET_PREFIX}{path}.forward", forward)
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        try:
            _detach_from_inference_mode(self.unet)
            self.unet.requires_grad_(False)
            yield
        finally:
            patcher.unpatch_model(unpatch_weights=False)


def _checkpointed_block_forwards(unet) -> dict[str, Callable]:
    """Per layer of every UNet block (ResBlock, SpatialTransformer, ...), a forward that recomputes the layer in the
    backward pass instead of storing its activations. Layers, not blocks: ComfyUI's UNet iterates a block's
    layers (`forward_timestep_embed`) and never calls the block's own forward."""
    blocks = {f"input_blocks.{i}": block for i, block in enumerate(unet.input_blocks)}
    blocks["middle_block"] = unet.middle_block
    blocks.update({f"output_blocks.{i}": block for i, block in enumerate(unet.output_blocks)})
    return {f"{path}.{name}": functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
            for path, block in blocks.items() for name, layer in block.named_children()}
