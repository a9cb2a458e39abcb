"""One training loop for a concept increment, over a small `Denoiser` protocol.

The same loop trains on a ComfyUI model (nodes/ supplies the adapter) and on a diffusers model (the toy world).
Task t trains its own LoRA factors and layer-wise token embeddings; older tasks are frozen and never rewritten.
The consolidation method decides whether old tasks take part in the forward pass (c-lora, finetune) or only
in the regularizer (cidm, cidm-official).
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .adapters import LayerLoRABank, TaskFactors, init_task_factors
from .aggregation import ConstantRouter
from .consolidation import ConsolidationWeights, make_consolidator
from .data import TEMPLATES, ImageSize, TrainingSet, make_prompt
from .errors import CIDMInputError, require_finite
from .layers import PROJECTIONS, CrossAttentionLayer
from .tokens import LayerwiseTextEncoder, concept_features, initial_embeddings, mean_embedding_norm


@dataclass
class TrainingConfig:
    steps: int = 400
    method: str = "cidm"
    rank: int = 4
    # LoRA multiplier h = Wx + multiplier·BAx (not alpha/rank), as the official code's LoRALinearLayer
    # (JiahuaDong/CIFC@9819aa8 `lib/models/edlora.py`).
    multiplier: float = 1.0
    lora_lr: float = 1e-4
    embedding_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 1
    noise_offset: float = 0.01
    embedding_norm_threshold: float = 0.55
    template: str = "object"
    seed: int = 0
    save_every: int = 0
    gradient_checkpointing: bool = False
    consolidation: ConsolidationWeights = field(default_factory=ConsolidationWeights)

    def validate(self) -> None:
        """Checks the settings before any work.

        Raises:
            CIDMInputError: naming the setting, when steps, rank or batch_size is below 1, a float setting (the
                learning rates, multiplier, the consolidation weights, ...) is NaN or ±inf, or a learning rate is
                negative.
        """
        if self.steps <= 0:
            raise CIDMInputError("steps", f"must be at least 1, got {self.steps}")
        if self.rank <= 0:
            raise CIDMInputError("rank", f"must be at least 1, got {self.rank}")
        if self.batch_size <= 0:
            raise CIDMInputError("batch_size", f"must be at least 1, got {self.batch_size}")
        weights = self.consolidation
        require_finite(lora_lr=self.lora_lr, embedding_lr=self.embedding_lr, multiplier=self.multiplier,
                       weight_decay=self.weight_decay, noise_offset=self.noise_offset,
                       embedding_norm_threshold=self.embedding_norm_threshold,
                       orthogonal_weight=weights.orthogonal, shared_weight=weights.shared,
                       official_weight=weights.official, clora_lambda=weights.clora)
        for name in ("lora_lr", "embedding_lr"):
            if not getattr(self, name) >= 0:
                raise CIDMInputError(name, f"must be ≥ 0, got {getattr(self, name)}")

    def hyperparameters(self) -> dict:
        return asdict(self)


@dataclass
class ConceptSpec:
    name: str
    tokens: list[str]
    class_words: list[str | None]  # per token; the first token always starts random


@dataclass
class PooledConditioning:
    """The extra conditioning of a family whose UNet also takes the pooled text output and the image sizes through
    its ADM input (SDXL, `cidm.family.ModelFamily.adm_channels`), per sample of a batch."""

    pooled: torch.Tensor  # [B, P]: each sample's pooled text output, P the family's pooled_width
    # Each sample's original size and crop (cidm.data.size_conditioning); None: uncropped at the latent's size.
    sizes: list[ImageSize | None]


class PooledTextEncoder(LayerwiseTextEncoder, Protocol):
    """The text encoder of a family with pooled conditioning (a Denoiser whose pooled_width is above 0)."""

    def encode_pooled(self, text: str, embeddings: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """([L, T, D], pooled [1, P]) as `encode`; both differentiable with respect to `embeddings`."""
        ...


class Denoiser(Protocol):
    """What the loop needs from a diffusion model."""

    layers: list[CrossAttentionLayer]
    pooled_width: int  # width P of the pooled text output `predict` takes; 0 when it takes none (SD1.5)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE [N, H, W, 3] in [0, 1] -> latents [N, C, h, w]."""

    def sample_noise_level(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """A training noise level per sample (a sigma or a timestep, the model's own)."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        ...

    def predict(self, noisy: torch.Tensor, level: torch.Tensor, context: torch.Tensor, *,
                extra: PooledConditioning | None = None) -> torch.Tensor:
        """The model's raw output (eps, v, ...) for a packed layer-wise context [B, L·T, D], with the pooled
        conditioning when pooled_width is above 0 (None otherwise)."""

    def target(self, latents: torch.Tensor, noise: torch.Tensor, level: torch.Tensor,
               noisy: torch.Tensor) -> torch.Tensor:
        """What `predict` should output for these latents, in the same parameterisation."""

    def adapted(self, banks: dict[int, LayerLoRABank], router) -> AbstractContextManager:
        """Context manager: the cross-attention layers run with these LoRA banks."""

    @property
    def device(self) -> torch.device:
        ...


@dataclass
class TrainingCallbacks:
    on_step: Callable[[int, int, float], None] = lambda step, total, loss: None
    check_interrupt: Callable[[], None] = lambda: None  # raises to stop; nothing is written on the way out
    save_state: Callable[[dict[str, torch.Tensor], dict], None] | None = None
    preview: Callable[[int], None] | None = None
    preview_every: int = 0


@dataclass
class TrainedTask:
    lora: TaskFactors
    embeddings: torch.Tensor  # [n, S, D]: one row per token slot (cidm.tokens)
    features: torch.Tensor  # [n, L, D]
    losses: list[float]
    embeddings_frozen_at: int | None
    consolidation_penalty: float  # the regularizer on the final factors: how hard the old tasks pulled at the end


def _trainable_factors(factors: TaskFactors) -> dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    return {key: (torch.nn.Parameter(down.clone()), torch.nn.Parameter(up.clone()))
            for key, (down, up) in factors.items()}


def _layer_banks(layers: list[CrossAttentionLayer], old_tasks: list[TaskFactors], current, scale: float):
    return {layer.index: LayerLoRABank(
        [{p: old[(layer.index, p)] for p in PROJECTIONS} for old in old_tasks], scale,
        trainable={p: current[(layer.index, p)] for p in PROJECTIONS}) for layer in layers}


def _linear_decay(total: int) -> Callable[[int], float]:
    return lambda step: max(0.0, 1.0 - step / total)


class ConceptTrainer:
    """Trains one concept increment. Holds everything a resume must restore. The encoder is a PooledTextEncoder
    when the denoiser takes pooled conditioning (`Denoiser.pooled_width` above 0)."""

    def __init__(self, denoiser: Denoiser, encoder: LayerwiseTextEncoder, training_set: TrainingSet,
                 concept: ConceptSpec, old_tasks: list[TaskFactors], config: TrainingConfig):
        config.validate()
        self.denoiser, self.encoder, self.concept, self.config = denoiser, encoder, concept, config
        self.training_set = training_set
        self.layers = denoiser.layers
        self.pooled = denoiser.pooled_width > 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.consolidator = make_consolidator(config.method, old_tasks, config.consolidation)
        self.active_old = old_tasks if self.consolidator.uses_old_in_forward else []
        self.lora = _trainable_factors(init_task_factors(self.layers, config.rank, self.generator))
        trained = self.consolidator.trained_projections
        for (_, proj), pair in self.lora.items():
            for param in pair:
                param.requires_grad_(proj in trained)
        class_words = concept.class_words if self.consolidator.class_word_in_prompt else []
        class_vectors = [encoder.word_embedding(w) if w else None for w in class_words]
        self.embeddings = torch.nn.Parameter(initial_embeddings(
            len(concept.tokens), encoder.num_slots, self.layers[0].context_dim, class_vectors, self.generator))
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for pair in self.lora.values() for p in pair if p.requires_grad], "lr": config.lora_lr},
             {"params": [self.embeddings], "lr": config.embedding_lr}],
            lr=config.lora_lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _linear_decay(config.steps))
        self.step = 0
        self.frozen_at: int | None = None
        if config.embedding_lr == 0:  # nothing to learn in the tokens: their contexts are cached from the start
            self.frozen_at = 0
            self.embeddings.requires_grad_(False)
        self.losses: list[float] = []
        self.context_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            self.latents = torch.cat([denoiser.encode_images(training_set.images[i:i + 1])
                                      for i in range(len(training_set.images))])

    # Resume -------------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"embeddings": self.embeddings.detach().clone(),
                   "generator": self.generator.get_state()}
        for (layer, proj), (down, up) in self.lora.items():
            tensors[f"lora.{layer}.{proj}.down"] = down.detach().clone()
            tensors[f"lora.{layer}.{proj}.up"] = up.detach().clone()
        for index, param in enumerate(self._parameters()):
            for name, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optimizer.{index}.{name}"] = value.detach().clone().reshape(value.shape)
        for name, value in self.consolidator.state_dict().items():
            tensors[f"consolidator.{name}"] = value
        meta = {"step": self.step, "frozen_at": self.frozen_at, "losses": self.losses,
                "identity": self.identity()}
        return tensors, meta

    def identity(self) -> dict:
        """What a saved state must match to be resumed."""
        return {"concept": self.concept.name, "tokens": self.concept.tokens, "method": self.config.method,
                "steps": self.config.steps, "rank": self.config.rank, "seed": self.config.seed,
                "images": len(self.training_set.images)}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Continue from a `state()` saved earlier.

        Raises:
            CIDMInputError: ("resume") when the state belongs to another run, or lacks or misshapes a tensor or
                its step and loss history; the message says to untick resume.
        """
        if meta.get("identity") != self.identity():
            raise CIDMInputError("resume", f"the saved training state is for {meta.get('identity')}, "
                                           f"not for this run {self.identity()}; untick resume to start over")
        for name, value in self.state()[0].items():
            found = tensors.get(name)
            if found is None or found.shape != value.shape or found.dtype != value.dtype:
                problem = "is missing" if found is None else f"is {found.dtype} {tuple(found.shape)}"
                raise CIDMInputError("resume", f"the saved training state is corrupt: tensor {name!r} {problem}, "
                                               f"expected {value.dtype} {tuple(value.shape)}; untick resume to "
                                               "start over")
        if not isinstance(meta.get("step"), int) or not 0 <= meta["step"] < self.config.steps \
                or not isinstance(meta.get("losses"), list):
            raise CIDMInputError("resume", f"the saved training state is corrupt: its step {meta.get('step')!r} or "
                                           "loss history is unusable; untick resume to start over")
        with torch.no_grad():
            self.embeddings.copy_(tensors["embeddings"])
            for (layer, proj), (down, up) in self.lora.items():
                down.copy_(tensors[f"lora.{layer}.{proj}.down"])
                up.copy_(tensors[f"lora.{layer}.{proj}.up"])
        self.generator.set_state(tensors["generator"])
        for index, param in enumerate(self._parameters()):
            state = {name.split(".", 2)[2]: value for name, value in tensors.items()
                     if name.startswith(f"optimizer.{index}.")}
            if state:
                self.optimizer.state[param] = state
        self.consolidator.load_state_dict({k[len("consolidator."):]: v for k, v in tensors.items()
                                           if k.startswith("consolidator.")})
        self.step, self.frozen_at, self.losses = meta["step"], meta["frozen_at"], list(meta["losses"])
        self.embeddings.requires_grad_(self.frozen_at is None)
        self.schedule.last_epoch = self.step
        for group, base in zip(self.optimizer.param_groups, self.schedule.base_lrs):
            group["lr"] = base * _linear_decay(self.config.steps)(self.step)

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.lora.values() for p in pair] + [self.embeddings]

    # Training -----------------------------------------------------------------------------------------------
    def _context(self, prompt: str, track_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([L·T, D] packed layer contexts, pooled [P] or None when the denoiser takes none); cached per prompt once
        the embeddings are frozen."""
        if prompt in self.context_cache:
            return self.context_cache[prompt]
        table = {token: self.embeddings[i] for i, token in enumerate(self.concept.tokens)}
        with torch.set_grad_enabled(track_grad and self.frozen_at is None):
            encoded, pooled = self.encoder.encode_pooled(prompt, table) if self.pooled \
                else (self.encoder.encode(prompt, table), None)
        packed, pooled = encoded.reshape(-1, encoded.shape[-1]), None if pooled is None else pooled[0]
        if self.frozen_at is not None:
            self.context_cache[prompt] = (packed.detach(), None if pooled is None else pooled.detach())
        return packed, pooled

    def _conditioning(self, prompts: list[str], sizes: list[ImageSize | None],
                      track_grad: bool = True) -> tuple[torch.Tensor, PooledConditioning | None]:
        """[B, L·T, D] contexts of `prompts` on the denoiser's device, with their pooled conditioning (None when the
        denoiser takes none)."""
        encoded = [self._context(prompt, track_grad) for prompt in prompts]
        device = self.denoiser.device
        context = torch.stack([packed for packed, _ in encoded]).to(device)
        if not self.pooled:
            return context, None
        return context, PooledConditioning(torch.stack([pooled for _, pooled in encoded]).to(device), sizes)

    def preview_contexts(self) -> tuple[torch.Tensor, PooledConditioning | None]:
        """([2, L·T, D], pooled conditioning or None): a template prompt for the concept and the empty prompt, with
        the current embeddings, for an uncropped image of the sample's size."""
        prompt = TEMPLATES[self.config.template][0].format(" ".join(self.concept.tokens))
        with torch.no_grad():
            return self._conditioning([prompt, ""], [None, None], track_grad=False)

    def _batch(self) -> tuple[torch.Tensor, list[str], list[ImageSize | None]]:
        count = len(self.latents)
        indices = torch.randint(count, (self.config.batch_size,), generator=self.generator).tolist()
        prompt_rng = random.Random(int(torch.randint(2**31, (1,), generator=self.generator)))
        prompts = [make_prompt(self.training_set.captions[i], self.concept.name, self.concept.tokens,
                               self.config.template, prompt_rng) for i in indices]
        sizes = self.training_set.sizes
        return self.latents[indices], prompts, [sizes[i] if sizes else None for i in indices]

    def train_step(self) -> float:
        """One optimizer step; returns the diffusion loss.

        Raises:
            CIDMInputError: ("lora_lr") when the loss or a gradient is not finite: the step is not taken, so the
                factors and any saved state stay as they were.
        """
        latents, prompts, sizes = self._batch()
        device = self.denoiser.device
        latents = latents.to(device)
        noise = torch.randn(latents.shape, generator=self.generator)
        noise = noise + self.config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=self.generator)
        noise = noise.to(device)
        level = self.denoiser.sample_noise_level(len(latents), self.generator).to(device)
        context, extra = self._conditioning(prompts, sizes)
        noisy = self.denoiser.add_noise(latents, noise, level)
        prediction = self.denoiser.predict(noisy, level, context, extra=extra)
        target = self.denoiser.target(latents, noise, level, noisy)
        diffusion_loss = F.mse_loss(prediction.float(), target.float())
        current = {key: (down, up) for key, (down, up) in self.lora.items()}
        loss = diffusion_loss + self.consolidator.loss(current, self.step)
        if not bool(torch.isfinite(loss)):
            raise CIDMInputError("lora_lr", f"training diverged at step {self.step + 1}: the loss is "
                                            f"{float(loss.detach())}; lower lora_lr or embedding_lr and train again")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradients and not bool(torch.stack([g.isfinite().all() for g in gradients]).all()):
            raise CIDMInputError("lora_lr", f"training diverged at step {self.step + 1}: a gradient is not finite; "
                                            "lower lora_lr or embedding_lr and train again")
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        if self.frozen_at is None and mean_embedding_norm(self.embeddings, self.encoder.norm_width) \
                >= self.config.embedding_norm_threshold:
            self.frozen_at = self.step
            self.embeddings.requires_grad_(False)
        return diffusion_loss.item()

    def run(self, callbacks: TrainingCallbacks) -> TrainedTask:
        """Trains from the current step to `config.steps` and returns the task.

        Raises:
            CIDMInputError: ("lora_lr") when training diverges (train_step).
        """
        banks = _layer_banks(self.layers, self.active_old, self.lora, self.config.multiplier)
        router = ConstantRouter([1.0] * (len(self.active_old) + 1))
        with self.denoiser.adapted(banks, router), torch.enable_grad():
            while self.step < self.config.steps:
                callbacks.check_interrupt()
                loss = self.train_step()
                self.losses.append(loss)
                callbacks.on_step(self.step, self.config.steps, loss)
                if callbacks.save_state and self.config.save_every and self.step % self.config.save_every == 0 \
                        and self.step < self.config.steps:
                    callbacks.save_state(*self.state())
                if callbacks.preview and callbacks.preview_every and self.step % callbacks.preview_every == 0:
                    callbacks.preview(self.step)
        return self.result()

    def result(self) -> TrainedTask:
        lora = {key: (down.detach().clone(), up.detach().clone()) for key, (down, up) in self.lora.items()}
        embeddings = self.embeddings.detach().clone()
        with torch.no_grad():
            penalty = float(self.consolidator.loss(lora, self.step))
        return TrainedTask(lora=lora, embeddings=embeddings, consolidation_penalty=penalty,
                           features=concept_features(self.encoder, self.concept.tokens, embeddings),
                           losses=list(self.losses), embeddings_frozen_at=self.frozen_at)
