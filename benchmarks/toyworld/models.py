"""The toy world's text-to-image base model, trained from scratch on generic objects only, and cached.

Pixel-space diffusion at 32×32 with a 2×2 pixel-unshuffle: the model's "latents" are the unshuffled image
[12, 16, 16] in [-1, 1]. Unshuffling only reorders pixels, so Gaussian noise stays Gaussian and this is plain
pixel diffusion, 2.3× faster than a native 32×32 UNet (toyworld-feasibility.md). Doing it in `to_model_space`
rather than in a wrapper module keeps the UNet's own module paths, which `cidm.layers` needs to find attn2.

The text side is a word-level tokenizer over the world's vocabulary (plus cidm's placeholder words) and a 2-layer
64-wide CLIPTextModel trained jointly with the UNet. DDPM cosine schedule, epsilon, min-SNR-5 loss weights, AdamW
with warm-up, gradient clipping and an EMA of the weights, which is what gets saved and sampled. Every
`scene_every`-th step is a batch of two-object scenes (32×64, half the batch size, so the same number of pixels),
so the model learns to draw one object per tile as the region compositions ask of it.

The cache key hashes the configuration, the tokenizer's words, this file and `world.py` (the generic world) only:
not the concepts, nor `cidm/`, so one base model serves every world seed and every method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from cidm.backends.diffusers_backend import SENTINEL_WORDS

from . import world

UNSHUFFLE = 2
LATENT_SHAPE = (3 * UNSHUFFLE ** 2, world.SIZE // UNSHUFFLE, world.SIZE // UNSHUFFLE)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CACHE = Path(os.environ.get("CIDM_CACHE", Path.home() / ".cache" / "cidm-comfyui")).resolve() / "toyworld"
COMMITTED = Path(__file__).parent / "weights"  # base models small enough to commit (fp16), found before the cache


@dataclass(frozen=True)
class BaseConfig:
    channels: tuple[int, ...] = (48, 96, 96)
    norm_groups: int = 16
    text_width: int = 64
    text_layers: int = 2
    max_tokens: int = 28  # a scene of two two-colour objects is 25 with BOS and EOS
    steps: int = 8000  # about an hour on a CPU core at 0.43 s/step
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 100
    ema: float = 0.999
    min_snr: float = 5.0
    images: int = 30000  # pre-rendered once, reused with horizontal flips
    scenes: int = 10000  # two-object scenes, pre-rendered once (flipped scenes swap their captions' sides)
    scene_every: int = 4  # every 4th step is a batch of scenes
    seed: int = 0

    def key(self) -> str:
        return cache_key(self, [Path(world.__file__), Path(__file__)], extra=tokenizer_words())


def cache_key(config, sources: list[Path], extra: list[str] = ()) -> str:
    """Names a cache entry: the configuration, the code that draws the data and builds the cached thing, and
    `extra` words that the code takes from elsewhere."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(json.dumps(list(extra)).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_words() -> list[str]:
    return [*SPECIAL_TOKENS, *world.vocabulary(), *SENTINEL_WORDS]


def build_tokenizer(max_tokens: int) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer with one token per world word, BOS/EOS around every text, padded to `max_tokens`."""
    words = tokenizer_words()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                         special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=max_tokens)


def build_text_encoder(config: BaseConfig, vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=config.text_width,
                                        intermediate_size=2 * config.text_width,
                                        num_hidden_layers=config.text_layers, num_attention_heads=4,
                                        max_position_embeddings=config.max_tokens, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2))


def build_unet(config: BaseConfig) -> UNet2DConditionModel:
    """Attention only at the two coarsest resolutions (8×8 and 4×4): 7 attn2 layers."""
    channels, side, _ = LATENT_SHAPE
    return UNet2DConditionModel(sample_size=side, in_channels=channels, out_channels=channels,
                                layers_per_block=1, block_out_channels=config.channels,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=config.text_width, attention_head_dim=8,
                                norm_num_groups=config.norm_groups)


def make_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False)


def sampling_scheduler(train_scheduler: DDPMScheduler, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(train_scheduler.config, clip_sample=True)
    scheduler.set_timesteps(steps)
    return scheduler


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [N, 32, 32, 3] in [0, 1] -> [N, 12, 16, 16] in [-1, 1]."""
    return F.pixel_unshuffle(images.permute(0, 3, 1, 2) * 2 - 1, UNSHUFFLE)


def to_images(latents: torch.Tensor) -> torch.Tensor:
    return (F.pixel_shuffle(latents, UNSHUFFLE).permute(0, 2, 3, 1) + 1).div(2).clamp(0, 1)


@dataclass
class BaseModel:
    config: BaseConfig
    tokenizer: PreTrainedTokenizerFast
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler

    def freeze(self) -> "BaseModel":
        for module in (self.unet, self.text_encoder):
            module.eval().requires_grad_(False)
        return self


def build_base(config: BaseConfig) -> BaseModel:
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.max_tokens)
    return BaseModel(config, tokenizer, build_text_encoder(config, len(tokenizer)), build_unet(config),
                     make_scheduler())


class EMA:
    """Exponential moving average of parameters, with the usual warm-up (decay grows from 0.1 to `decay`)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters, self.decay = parameters, decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for param, shadow in zip(self.parameters, self.shadow):
            param.copy_(shadow)


def _rendered(items: list[world.Sample] | list[world.Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([item.image for item in items]))


def _flipped(item: world.Sample | world.Scene) -> world.Sample | world.Scene:
    """The caption's item for a horizontally flipped image: a scene's left and right objects trade places."""
    if isinstance(item, world.Scene):
        return world.Scene(item.image, item.looks[::-1], item.background)
    return item


def _resume_state(path: Path, base: BaseModel, optimizer, ema: "EMA", rng: np.random.Generator,
                  generator: torch.Generator) -> int:
    """Restores a checkpoint written by `_checkpoint` into the live objects; returns the step to continue from."""
    if not path.exists():
        return 0
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    parameters = ema.parameters
    with torch.no_grad():
        for index, (param, shadow) in enumerate(zip(parameters, ema.shadow)):
            param.copy_(tensors[f"param.{index}"])
            shadow.copy_(tensors[f"ema.{index}"])
    state = json.loads(meta["optimizer"])
    for index in range(len(parameters)):
        if f"adam.{index}.exp_avg" in tensors:
            state["state"][str(index)] = {name: tensors[f"adam.{index}.{name}"] for name in ("step", "exp_avg",
                                                                                           "exp_avg_sq")}
    optimizer.load_state_dict({"state": {int(k): v for k, v in state["state"].items()},
                               "param_groups": state["param_groups"]})
    rng.bit_generator.state = json.loads(meta["rng"])
    generator.set_state(tensors["generator"])
    return int(meta["step"])


def _checkpoint(path: Path, step: int, optimizer, ema: "EMA", rng: np.random.Generator,
                generator: torch.Generator) -> None:
    """Everything the training loop needs to continue at `step` exactly as if it had never stopped."""
    tensors = {"generator": generator.get_state()}
    for index, (param, shadow) in enumerate(zip(ema.parameters, ema.shadow)):
        tensors[f"param.{index}"], tensors[f"ema.{index}"] = param.detach(), shadow
    saved = optimizer.state_dict()
    for index, value in saved["state"].items():
        for name, tensor in value.items():
            tensors[f"adam.{index}.{name}"] = tensor
    meta = {"step": str(step), "rng": json.dumps(rng.bit_generator.state),
            "optimizer": json.dumps({"state": {}, "param_groups": saved["param_groups"]})}
    save_atomically(tensors, path, meta)


def train_base(config: BaseConfig, log: Callable[[str], None] = print, checkpoint: Path | None = None,
               checkpoint_every: int = 250, device: str = "cpu") -> BaseModel:
    """Trains the base model on generic objects and scenes (never a concept) and returns it on the CPU with the EMA
    weights rounded to fp16 (what is saved), frozen. With `checkpoint`, the loop state is saved there every
    `checkpoint_every` steps and a run that was stopped continues from it, to the same result. On another `device`
    (e.g. "cuda") the random draws stay on the CPU, so only the arithmetic differs."""
    base = build_base(config)
    base.unet.to(device)
    base.text_encoder.to(device)
    workers = os.cpu_count() or 1
    samples = world.generic_samples(config.images, config.seed, workers)
    scenes = world.generic_scenes(config.scenes, config.seed, workers)
    pixels = {False: _rendered(samples).to(device), True: _rendered(scenes).to(device)}
    rng = np.random.default_rng([config.seed, 3])
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [*base.unet.parameters(), *base.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    ema = EMA(parameters, config.ema)
    first = _resume_state(checkpoint, base, optimizer, ema, rng, generator) if checkpoint else 0
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup),
                                               last_epoch=first - 1)
    if first:
        log(f"base model: resumed at step {first} from {checkpoint}")
    alphas = base.scheduler.alphas_cumprod
    # min-SNR-γ for epsilon prediction: weight min(SNR, γ) / SNR, so the easy low-noise steps stop dominating.
    snr_weight = ((alphas / (1 - alphas)).clamp(max=config.min_snr) / (alphas / (1 - alphas))).to(device)
    base.unet.train()
    base.text_encoder.train()
    started = time.monotonic()
    for step in range(first, config.steps):
        wide = config.scene_every > 0 and step % config.scene_every == config.scene_every - 1
        items = scenes if wide else samples
        batch = max(1, config.batch_size // 2) if wide else config.batch_size
        indices = rng.integers(len(items), size=batch)
        images = pixels[wide][torch.from_numpy(indices).to(device)].float() / 255
        flip = rng.random(batch) < 0.5
        images = torch.where(torch.from_numpy(flip).to(device)[:, None, None, None], images.flip(2), images)
        captions = [world.base_caption(_flipped(items[i]) if f else items[i], rng) for i, f in zip(indices, flip)]
        ids = base.tokenizer(captions, padding="max_length", max_length=config.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        clean = to_model_space(images)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, len(alphas), (batch,), generator=generator).to(device)
        noisy = base.scheduler.add_noise(clean, noise, timesteps)
        prediction = base.unet(noisy, timesteps, encoder_hidden_states=base.text_encoder(ids).last_hidden_state).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (snr_weight[timesteps] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        warmup.step()
        ema.update(step)
        if (step + 1) % max(1, config.steps // 20) == 0:
            log(f"base model: step {step + 1}/{config.steps}, loss {loss.item():.4f}, "
                f"{time.monotonic() - started:.0f} s")
        if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
            _checkpoint(checkpoint, step + 1, optimizer, ema, rng, generator)
    ema.copy_to_parameters()
    with torch.no_grad():
        for param in parameters:
            param.copy_(param.half().float())
    base.unet.cpu()
    base.text_encoder.cpu()
    return base.freeze()


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Writes next to `path` and renames, so an interrupted run never leaves a cache entry that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
    partial.replace(path)


def save_base(base: BaseModel, path: Path) -> None:
    """fp16 (the weights `train_base` returns are already rounded to it, so nothing is lost)."""
    tensors = {f"unet.{k}": v.half() for k, v in base.unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.half() for k, v in base.text_encoder.state_dict().items()})
    save_atomically(tensors, path, {"config": json.dumps(asdict(base.config))})


def load_base(config: BaseConfig, path: Path) -> BaseModel:
    base = build_base(config)
    tensors = load_file(str(path))
    for prefix, module in (("unet.", base.unet), ("text_encoder.", base.text_encoder)):
        module.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
    return base.freeze()


def base_path(config: BaseConfig, cache: Path = CACHE) -> Path:
    """The committed copy (`weights/`) if there is one for this configuration, else the cache entry."""
    name = f"base-{config.key()}.safetensors"
    committed = COMMITTED / name
    return committed if committed.exists() else cache / name


def load_or_train_base(config: BaseConfig, cache: Path = CACHE, log: Callable[[str], None] = print,
                       device: str = "cpu") -> BaseModel:
    """The committed or cached base model for this configuration, else trained on `device` (deterministically from
    its seed, continuing from a checkpoint left by a stopped build) and cached."""
    path = base_path(config, cache)
    if path.exists():
        log(f"base model: {path}")
        return load_base(config, path)
    checkpoint = path.with_suffix(".checkpoint")
    base = train_base(config, log, checkpoint=checkpoint, device=device)
    save_base(base, path)
    checkpoint.unlink(missing_ok=True)
    log(f"base model: saved {path}")
    return base


def main() -> None:
    """Builds (or finds) the full configuration's base model: `python -m benchmarks.toyworld.models`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (about 1 h on a CPU core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_or_train_base(BaseConfig(), args.cache, log=lambda line: print(line, flush=True), device=args.device)


if __name__ == "__main__":
    main()
