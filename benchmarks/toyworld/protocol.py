"""The continual-learning protocol: learn the world's concepts one task at a time, judge every learned concept after
every task.

Everything that learns or composes goes through the same cidm code as the ComfyUI nodes: `ConceptTrainer` (with
`TrainingConfig.method` choosing the consolidator via `make_consolidator`), the previous tasks' LoRA factors passed
as `old_tasks`, and at sampling time the product's routers (`make_router`: `named`, the default, `elastic`, `fixed`;
each prompt routed once, `RowRouter` serving the weights per layer) and `LayerLoRABank` under
`DiffusersDenoiser.adapted`. Compositions use the Context-Controlled KSampler's default, region-aware
cross-attention (`cidm.regions.region_cross_attention` through `CIDMRegionAttnProcessor`), one UNet call per step.
Only the sampler (DDIM with classifier-free guidance) and the judging are the benchmark's own.

After task t, for every learned concept c, M samples on each of K prompts "a <c> {shape} on a {bg} background"
("a <c> on a {bg} background" for C-LoRA, which keeps the class word out; K backgrounds, including the one no
training image used) give acc[t][c] (the oracle names c), strict[t][c] (named with p ≥ 0.9), context[t][c] (the
background is right), the mean routing weight on c's own task, and, for a same-shape pair, the weight on and oracle
rate of the partner. Baselines: the upper bound (each concept's own independently trained LoRA, alone: routing by
an oracle) and the composition upper bound (two such LoRAs, each region under its own only), control prompts (the
closest generic object, which must not come out as the concept), and Q5 (ordinary prompts with every concept
aggregated, against the base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors.torch import load_file

from cidm.adapters import LayerLoRABank
from cidm.aggregation import ConstantRouter, RowRouter, make_router
from cidm.backends.diffusers_backend import DiffusersDenoiser, DiffusersLayerwiseEncoder, RegionBatch
from cidm.consolidation import CONSOLIDATORS, METHODS, ConsolidationWeights
from cidm.data import TrainingSet
from cidm.layers import PROJECTIONS
from cidm.regions import box_mask
from cidm.routing import LayerwisePrompt
from cidm.tokens import ConceptVocabulary, vocabulary_from_tasks
from cidm.train import ConceptSpec, ConceptTrainer, TrainedTask, TrainingCallbacks, TrainingConfig

from . import concepts, models, world
from .concepts import Concept, ConceptWorld
from .oracle import GARBAGE, Oracle, as_images, judge

UPPER_BOUND = "upper bound"
# A toy-only baseline (issue #33: a setting where forgetting shows): one LoRA trained on from task to task, each task
# starting from the last one's factors, with no regularizer and no replay; every concept is then sampled through that
# one LoRA (and its own tokens). The classic catastrophic-forgetting setting.
SHARED = "finetune-shared"
RUN_METHODS = (*METHODS, SHARED)  # what a run may name (`--only`, `--methods`); ProtocolConfig.methods' default
# stays the product's METHODS
# The reference freezes token embeddings at mean norm 0.55, about 1.4× a typical SD CLIP word embedding; the toy
# text encoder's embeddings have their own scale, so the threshold is set relative to it.
FREEZE_AT_NORM_RATIO = 1.4
SAMPLING_BATCH = 64
HALVES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 0.5, 1.0))


@dataclass(frozen=True)
class Layout:
    """A two-tile composition: each region's box (left, top, width, height) as canvas fractions, and whether the
    global prompt names both concepts ("a <zarp> star on the left and ...") or none ("a star on the left and ...")."""

    boxes: tuple[tuple[float, float, float, float], ...]
    global_names_concepts: bool = True


# Judged tile by tile (issue #14: left/right, plus overlapping and unequal boxes). Overlapping: the middle quarter of
# the canvas is shared by both regions. Unequal: the second region is a smaller box inside its tile (56 % of it); the
# rest of that tile attends to the global prompt. Global names none (issue #29): the halves under a global prompt
# with the class words only, so each concept can come from its own region alone.
LAYOUTS = {"left/right": Layout(HALVES),
           "overlapping": Layout(((0.0, 0.0, 0.625, 1.0), (0.375, 0.0, 0.625, 1.0))),
           "unequal": Layout(((0.0, 0.0, 0.5, 1.0), (0.5625, 0.125, 0.375, 0.75))),
           "global names none": Layout(HALVES, global_names_concepts=False)}
REGION_PREFIX = "regions:"  # marks composition samples among a kept run's samples


@dataclass(frozen=True)
class ProtocolConfig:
    methods: tuple[str, ...] = METHODS
    tasks: int = 10
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        steps=300, rank=4, lora_lr=1e-3, embedding_lr=5e-3, batch_size=10))
    # toy world v2.6: 10, two per training background (v2.1 to v2.5: 5, CIFC's 4 to 7 per concept). The same 300
    # steps of 10 draw from them, so training costs the same; seed 1's sits and durl then passed the learnability
    # bar, and ribg did not (toy README, "Learnability", v2.6)
    images_per_concept: int = 10
    backgrounds: tuple[str, ...] = tuple(world.BACKGROUNDS)  # K prompts per concept
    samples_per_prompt: int = 3  # M
    # the upper bound's single concepts (toy world v2.4): the learnability bar is read per concept, and 72 samples
    # put a rate of 0.85 within ± 0.04 (18 samples: ± 0.08); its compositions keep `samples_per_prompt`
    upper_bound_samples_per_prompt: int = 12
    generic_prompts: int = 48  # Q5
    sampling_steps: int = 10
    sampler: str = "ddim"  # a key of SAMPLERS
    guidance: float = 2.5  # v2.1 ran at 4, which pulled learned concepts away (toy README, "Learnability")
    seed: int = 0
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    # a key of TOKEN_SLOT_RULES: one concept-token slot per attn2 layer (the paper's, and every run before issue
    # #30), one per resolution stage (`stage_slots`), the toy model's analogue of SDXL's shared slots, or one
    # for every layer
    token_slots: str = "layer"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:  # checked here, before any training, not at the first sampling
            raise ValueError(f"sampler {self.sampler!r}: expected one of {sorted(SAMPLERS)}")
        if self.token_slots not in TOKEN_SLOT_RULES:
            raise ValueError(f"token_slots {self.token_slots!r}: expected one of {sorted(TOKEN_SLOT_RULES)}")


def _scheduler(scheduler_class, **options):
    """A sampler of `SAMPLERS`: `scheduler_class` on the base model's training schedule, with `options`, set to a
    number of steps."""
    def make(train_scheduler: DDPMScheduler, steps: int):
        scheduler = scheduler_class.from_config(train_scheduler.config, **options)
        scheduler.set_timesteps(steps)
        return scheduler
    return make


# The deterministic samplers the protocol can sample with (`ProtocolConfig.sampler`), each from the base model's
# training schedule and a number of steps; each needs one model call per step and no noise after the first.
# - "ddim": the base model's own (`models.sampling_scheduler`), `leading` spacing: 10 steps from t = 900 (ᾱ = 0.024).
# - "ddim-trailing": the same with `trailing` spacing, 10 steps from t = 999, the model's noisiest input ("always start
#   from the last timestep": Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv
#   2305.08891, fix 3). Its steps are evenly spaced, so diffusers' DDIM step (t minus 1000 / steps) is right for it.
# - "dpm++2m": DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), its x0 clipped to [-1, 1] as DDIM's
#   `clip_sample` does (dynamic thresholding with `sample_max_value` 1 is a clip).
SAMPLERS = {"ddim": models.sampling_scheduler,
            "ddim-trailing": _scheduler(DDIMScheduler, clip_sample=True, timestep_spacing="trailing"),
            "dpm++2m": _scheduler(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2,
                                  thresholding=True, sample_max_value=1.0)}


@dataclass
class Setup:
    base: models.BaseModel
    oracle: Oracle
    world: ConceptWorld


@dataclass
class LearnedConcept:
    concept: Concept
    tokens: list[str]
    task: TrainedTask
    class_word: bool  # whether its prompts name the class word ("a <zarp> star") or not ("a <zarp>", C-LoRA)

    def caption(self, background: str) -> str:
        return self.concept.caption(background, self.class_word)


@dataclass
class MethodRun:
    trainers: list[ConceptTrainer]  # kept so a caller can check what did the training
    learned: list[LearnedConcept]
    scores: dict
    samples: dict[str, torch.Tensor]  # concept -> its samples after the last task [K·M, 32, 32, 3]
    region_samples: dict[str, torch.Tensor] = field(default_factory=dict)  # "a+b" -> [K·M, 32, 64, 3]


def concept_tokens(concept: Concept) -> list[str]:
    return [f"<{concept.name}1>", f"<{concept.name}2>"]


def training_set(concept: Concept, config: ProtocolConfig, world_seed: int, class_word: bool = True) -> TrainingSet:
    """The concept's `config.images_per_concept` training images, spread evenly over the training backgrounds (all
    but the held-out one), each placed at random; 5 is one per background, 10 (the default) two. Sources are
    `<name>-<background>-<index>`, unique, so they can name files."""
    backgrounds = world.training_backgrounds()
    per_background = -(-config.images_per_concept // len(backgrounds))
    drawn = concepts.concept_samples(concept, backgrounds, world_seed, per_background)  # background by background
    samples = [s for i in range(per_background) for s in drawn[i::per_background]][:config.images_per_concept]
    images = as_images(samples)
    return TrainingSet(images, [concept.caption(s.background, class_word) for s in samples],
                       [f"{concept.name}-{s.background}-{n}" for n, s in enumerate(samples)])


def make_denoiser(base: models.BaseModel) -> DiffusersDenoiser:
    return DiffusersDenoiser(base.unet, base.scheduler, to_model_space=models.to_model_space,
                             tokens_per_layer=base.config.max_tokens)


def stage_slots(layer_paths: list[str]) -> list[int]:
    """One token slot per resolution stage of a diffusers UNet: down block i and up block n-1-i (n down blocks) work
    at the same resolution, the mid block at the coarsest. The toy model's 7 attn2 layers share 2 slots (8×8: down
    block 1 and up block 1's two; 4×4: down block 2, the mid block and up block 0's two), about as many layers per
    slot as SDXL's 70 layers in 11 stacks (`cidm.family.ModelFamily.token_slots`), whose stacks of one layer each
    here would change nothing."""
    blocks = 1 + max(int(path.split(".")[1]) for path in layer_paths if path.startswith("down_blocks."))

    def stage(path: str) -> int:
        if path.startswith("mid_block."):
            return blocks - 1
        index = int(path.split(".")[1])
        return index if path.startswith("down_blocks.") else blocks - 1 - index
    numbers: dict[int, int] = {}
    return [numbers.setdefault(stage(path), len(numbers)) for path in layer_paths]


# ProtocolConfig.token_slots: layer paths -> the slot of each layer; "one" is one slot for every layer, a single
# token embedding (issue #33's ablation of layer-wise tokens)
# the cidm consolidation terms a run trains with (issue #33's ablations): name -> which of the two weights of
# cidm.consolidation.ConsolidationWeights (orthogonal, shared) keep their value; a dropped term's weight is 0
CONSOLIDATION_TERMS = {"both": ("orthogonal", "shared"), "orthogonal": ("orthogonal",), "shared": ("shared",),
                       "none": ()}


def consolidation_weights(terms: str, weights: ConsolidationWeights) -> ConsolidationWeights:
    """`weights` with the terms that `terms` (a CONSOLIDATION_TERMS key) drops set to 0.

    Raises:
        ValueError: for an unknown `terms`."""
    if terms not in CONSOLIDATION_TERMS:
        raise ValueError(f"consolidation {terms!r}: expected one of {sorted(CONSOLIDATION_TERMS)}")
    kept = CONSOLIDATION_TERMS[terms]
    return dataclasses.replace(weights, **{term: 0.0 for term in ("orthogonal", "shared") if term not in kept})


def consolidation_name(weights: dict) -> str:
    """The CONSOLIDATION_TERMS key of a run's (JSON) consolidation weights: the terms whose weight is not 0."""
    kept = tuple(term for term in ("orthogonal", "shared") if weights.get(term, 0) != 0)
    return next(name for name, terms in CONSOLIDATION_TERMS.items() if terms == kept)


TOKEN_SLOT_RULES = {"layer": lambda paths: list(range(len(paths))), "stage": stage_slots,
                    "one": lambda paths: [0] * len(paths)}


def make_encoder(base: models.BaseModel, layer_paths: list[str], rule: str) -> DiffusersLayerwiseEncoder:
    return DiffusersLayerwiseEncoder(base.tokenizer, base.text_encoder, len(layer_paths),
                                     TOKEN_SLOT_RULES[rule](layer_paths))


class Composer:
    """One base model with a set of learned concepts: encodes prompts, routes each prompt once with the product's
    router of `mode` (cidm.aggregation.make_router), samples, and reports routing weights."""

    def __init__(self, setup: Setup, learned: list[LearnedConcept], config: ProtocolConfig, mode: str = "named"):
        self.config, self.mode = config, mode
        self.denoiser = make_denoiser(setup.base)
        self.encoder = make_encoder(setup.base, [layer.path for layer in self.denoiser.layers], config.token_slots)
        self.vocabulary: ConceptVocabulary = vocabulary_from_tasks(
            [c.concept.name for c in learned], [c.tokens for c in learned], [c.task.embeddings for c in learned])
        tasks = [c.task for c in learned]
        self.banks = {layer.index: LayerLoRABank([{p: t.lora[(layer.index, p)] for p in PROJECTIONS} for t in tasks],
                                                 config.training.multiplier) for layer in self.denoiser.layers}
        self.router = make_router(mode, [t.features for t in tasks], fixed_weights=[1.0] * len(tasks),
                                  task_tokens=[c.tokens for c in learned]) if tasks else None
        self._encoded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.uncond = self.encoded("")[0]

    def encoded(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed layer-wise context [L·T, D], routing weights [L, K] or None without concepts) of a prompt that
        may name learned concepts as <name>; computed once per prompt."""
        if prompt not in self._encoded:
            expanded = self.vocabulary.expand(prompt)
            with torch.no_grad():
                layers = self.encoder.encode(expanded, self.vocabulary.embeddings)
            weights = None if self.router is None else self.router.route(
                LayerwisePrompt(layers.float(), tuple(self.vocabulary.tokens_in(expanded)), "toyworld"), None,
                len(self.denoiser.layers))
            self._encoded[prompt] = layers.reshape(-1, layers.shape[-1]), weights
        return self._encoded[prompt]

    def task_weights(self, prompt: str) -> torch.Tensor:
        """The router's weights [K] for a prompt, averaged over the cross-attention layers."""
        return self.encoded(prompt)[1].mean(dim=0)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """DDIM + classifier-free guidance; the same seed gives the same starting noise whatever the method."""
        return self._sample(prompts, [], seeds, models.LATENT_SHAPE)

    @torch.no_grad()
    def sample_regions(self, prompts: list[tuple[str, ...]], seeds: list[int],
                       boxes: tuple[tuple[float, float, float, float], ...] = HALVES) -> torch.Tensor:
        """Two tiles side by side ([N, 32, 64, 3]) by the product's region-aware cross-attention (one UNet call per
        step): each prompt tuple is a global prompt, then one prompt per region; region u spans the canvas
        fractions boxes[u] = (left, top, width, height). Each region's image tokens attend to its own prompt
        through only the concepts that prompt names (with `named` routing: oracle routing per region)."""
        channels, height, width = models.LATENT_SHAPE
        masks = [box_mask(*box, size=(height, 2 * width)) for box in boxes]
        return self._sample([p[0] for p in prompts], [[p[1 + u] for p in prompts] for u in range(len(boxes))],
                            seeds, (channels, height, 2 * width), masks)

    def _sample(self, prompts: list[str], regions: list[list[str]], seeds: list[int], shape: tuple[int, ...],
                masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        chunks = []
        for start in range(0, len(seeds), SAMPLING_BATCH):
            batch = slice(start, start + SAMPLING_BATCH)
            noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[batch]]
            chunks.append(self._denoise(torch.stack(noise), prompts[batch], [r[batch] for r in regions], masks))
        return torch.cat(chunks)

    def _rows(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(contexts [2B, L·T, D], weights [2B, L, K] or None) of the cond rows, then the uncond rows; an uncond row
        gets its cond row's weights ("match cond": for a global prompt, its own; never a region prompt's, as
        cidm.routing.route_conds pairs the negative with whole-canvas conds only)."""
        encoded = [self.encoded(p) for p in prompts]
        contexts = torch.stack([c for c, _ in encoded] + [self.uncond] * len(prompts))
        if self.router is None:
            return contexts, None
        weights = torch.stack([w for _, w in encoded])
        return contexts, torch.cat([weights, weights])

    def _denoise(self, latents: torch.Tensor, prompts: list[str], regions: list[list[str]],
                 masks: list[torch.Tensor] | None) -> torch.Tensor:
        """Cond and uncond rows in one model call per step, then classifier-free guidance."""
        scheduler = self.scheduler()
        contexts, weights = self._rows(prompts)
        adapted = contextlib.nullcontext()
        if weights is not None or regions:
            batch = None
            if regions:
                routed = [self._rows(r) for r in regions]
                batch = RegionBatch(masks, [c for c, _ in routed], [w for _, w in routed],
                                    [False] * len(prompts) + [True] * len(prompts), tuple(latents.shape[-2:]))
            router = RowRouter(weights) if weights is not None else ConstantRouter([])
            adapted = self.denoiser.adapted(self.banks, router, batch)
        with adapted:
            latents = self._steps(scheduler, scheduler.timesteps, latents, contexts)
        return models.to_images(latents)

    def scheduler(self):
        """A fresh sampler of `config.sampler` set to `config.sampling_steps` (SAMPLERS)."""
        return SAMPLERS[self.config.sampler](self.denoiser.scheduler, self.config.sampling_steps)

    def _steps(self, scheduler, timesteps, latents: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """`timesteps` of the sampler with classifier-free guidance, the cond rows of `contexts` then the uncond
        rows in one model call per step, under whatever attention the caller has put in place."""
        for timestep in timesteps:
            cond, uncond = self.denoiser.predict(torch.cat([latents] * 2), timestep.expand(2 * len(latents)),
                                                 contexts).chunk(2)
            latents = scheduler.step(uncond + self.config.guidance * (cond - uncond), timestep, latents).prev_sample
        return latents


def _rate(flags) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def judge_concept(composer: Composer, item: LearnedConcept, partner: str | None, config: ProtocolConfig,
                  oracle: Oracle) -> tuple[dict, torch.Tensor]:
    """Scores for one learned concept, and its samples (rows: backgrounds, columns: seeds)."""
    concept = item.concept
    prompts = [item.caption(bg) for bg in config.backgrounds for _ in range(config.samples_per_prompt)]
    backgrounds = [bg for bg in config.backgrounds for _ in range(config.samples_per_prompt)]
    seeds = [config.seed * 1000 + i for i in range(len(prompts))]
    images = composer.sample(prompts, seeds)
    verdict = judge(oracle, images)
    named = verdict.predictions["concept"]
    scores = {"acc": _rate([n == concept.name for n in named]),
              "strict": _rate(verdict.confident("concept", concept.name)),
              "context": _rate([p == bg for p, bg in zip(verdict.predictions["background"], backgrounds)]),
              "garbage": _rate([n == GARBAGE for n in named]),
              "partner_rate": _rate([n == partner for n in named]) if partner else None}
    if composer.router is not None and composer.mode != "fixed":  # fixed weights are 1 everywhere: nothing to show
        learned = list(composer.vocabulary.concept_tokens)
        weights = torch.stack([composer.task_weights(item.caption(bg)) for bg in config.backgrounds]).mean(dim=0)
        scores["weight_right"] = float(weights[learned.index(concept.name)])
        scores["weight_partner"] = float(weights[learned.index(partner)]) if partner else None
    return scores, images


def region_pairs(learned: list[LearnedConcept], concept_world: ConceptWorld) -> list[tuple[LearnedConcept,
                                                                                          LearnedConcept]]:
    """Every same-shape pair, then concept i with concept i + n/2 where their shapes differ."""
    by_name = {c.concept.name: c for c in learned}
    pairs = [(by_name[a], by_name[b]) for a, b in concept_world.same_shape_pairs() if a in by_name and b in by_name]
    half = len(learned) // 2
    pairs += [(learned[i], learned[i + half]) for i in range(half)
              if learned[i].concept.look.shape != learned[i + half].concept.look.shape]
    return pairs


def composition_prompts(first: LearnedConcept, second: LearnedConcept, background: str,
                        global_names_concepts: bool = True) -> tuple[str, str, str]:
    """The global prompt naming both ("a <zarp> star on the left and a <quil> star on the right on a white
    background", as the base model's two-object scenes are captioned) or, with `global_names_concepts` False, only
    their class words ("a star on the left and a star on the right ..."), then each tile's region prompt."""
    phrases = tuple(item.concept.phrase(item.class_word) if global_names_concepts else f"a {item.concept.look.shape}"
                    for item in (first, second))
    return world.scene_caption(phrases, background), first.caption(background), second.caption(background)


PairSampler = Callable[[LearnedConcept, LearnedConcept, list[tuple[str, str, str]], list[int],
                        tuple[tuple[float, float, float, float], ...]], torch.Tensor]


def judge_regions(pairs: list[tuple[LearnedConcept, LearnedConcept]], sample_pair: PairSampler,
                  config: ProtocolConfig, oracle: Oracle) -> tuple[dict, dict[str, torch.Tensor]]:
    """Two-concept compositions, per layout of `config.layouts` and pair: is each concept drawn in its own tile
    (judged tile by tile), and how often does a tile show the other concept (bleed)? `sample_pair` draws a pair's
    [N, 32, 64, 3] samples for its (global, left, right) prompts and region boxes. Samples are kept for the
    left/right layout."""
    scores, samples = {}, {}
    for layout in config.layouts:
        scores[layout] = {}
        for a, b in pairs:
            prompts = [composition_prompts(a, b, bg, LAYOUTS[layout].global_names_concepts)
                       for bg in config.backgrounds for _ in range(config.samples_per_prompt)]
            images = sample_pair(a, b, prompts, [config.seed * 1000 + i for i in range(len(prompts))],
                                 LAYOUTS[layout].boxes)
            name = f"{a.concept.name}+{b.concept.name}"
            scores[layout][name] = tile_scores(images, a, b, oracle)
            if LAYOUTS[layout] == LAYOUTS["left/right"]:
                samples[name] = images
    return scores, samples


def tile_scores(images: torch.Tensor, first: LearnedConcept, second: LearnedConcept, oracle: Oracle,
                either_order: bool = False) -> dict:
    """Two-tile canvases [N, 32, 64, 3] judged tile by tile: `both` (the first concept in the left tile and the
    second in the right; with `either_order`, or the other way round), `left`, `right`, `bleed` (a tile shows the
    other concept) and whether the two share a shape."""
    tiles = images.shape[2] // 2
    left, right = (judge(oracle, tile).predictions["concept"] for tile in (images[:, :, :tiles], images[:, :, tiles:]))
    a, b = first.concept.name, second.concept.name
    ordered = [x == a and y == b for x, y in zip(left, right)]
    either = [o or (x == b and y == a) for o, x, y in zip(ordered, left, right)]
    return {"both": _rate(either if either_order else ordered),
            "left": _rate([x == a for x in left]), "right": _rate([y == b for y in right]),
            "bleed": _rate([x == b or y == a for x, y in zip(left, right)]),
            "same_shape": first.concept.look.shape == second.concept.look.shape}


def partner_of(concept: Concept, learned: list[str], concept_world: ConceptWorld) -> str | None:
    """The learned concept of the same shape, if any (a world has at most one per concept)."""
    for a, b in concept_world.same_shape_pairs():
        if concept.name in (a, b):
            other = b if concept.name == a else a
            if other in learned:
                return other
    return None


def freeze_threshold(base: models.BaseModel) -> float:
    table = base.text_encoder.get_input_embeddings().weight
    ids = [base.tokenizer(word, add_special_tokens=False).input_ids[0] for word in world.vocabulary()]
    return FREEZE_AT_NORM_RATIO * table[ids].norm(dim=1).mean().item()


def learn(setup: Setup, index: int, old: list[LearnedConcept], method: str,
          config: ProtocolConfig) -> tuple[ConceptTrainer, LearnedConcept]:
    """Task `index`: the concept's own LoRA and tokens, with the earlier tasks' factors as `old_tasks`. The seed
    depends on the concept only, so every method's first task (and the upper bound's) starts identically. Methods
    that keep the class word out of the prompt (C-LoRA) get captions without it, here and when judged."""
    concept = setup.world.concepts[index]
    shared = method == SHARED
    class_word = consolidator_of(method).class_word_in_prompt
    training = dataclasses.replace(config.training, method=trained_as(method), seed=config.seed + index,
                                   embedding_norm_threshold=freeze_threshold(setup.base))
    denoiser = make_denoiser(setup.base)
    trainer = ConceptTrainer(denoiser, make_encoder(setup.base, [layer.path for layer in denoiser.layers],
                                                    config.token_slots),
                             training_set(concept, config, setup.world.seed, class_word),
                             ConceptSpec(concept.name, concept_tokens(concept), [None, concept.look.shape]),
                             [] if shared else [c.task.lora for c in old], training)
    if shared and old:  # train on from the shared LoRA as the last task left it
        with torch.no_grad():
            for key, (down, up) in trainer.lora.items():
                down.copy_(old[-1].task.lora[key][0])
                up.copy_(old[-1].task.lora[key][1])
    return trainer, LearnedConcept(concept, concept_tokens(concept), trainer.run(TrainingCallbacks()), class_word)


def trained_as(method: str) -> str:
    """The trainer's method (cidm.consolidation.METHODS) a run method trains with: SHARED trains as cidm with no
    old task (so its consolidation terms are 0) and no replay."""
    return "cidm" if method == SHARED else method


def consolidator_of(method: str):
    """The consolidator class whose attributes (prompts with the class word, old tasks in the forward pass) a run
    method follows."""
    return CONSOLIDATORS[trained_as(method)]


def composed(method: str, learned: list[LearnedConcept]) -> list[LearnedConcept]:
    """The concepts as `method` samples them after its last task: SHARED's all through the last task's LoRA (the
    one LoRA trained on), each with its own tokens; any other method's as learned."""
    if method != SHARED or not learned:
        return learned
    last = learned[-1].task.lora
    return [dataclasses.replace(item, task=dataclasses.replace(item.task, lora=last)) for item in learned]


def judge_stage(composer: Composer, learned: list[LearnedConcept], config: ProtocolConfig,
                oracle: Oracle, concept_world: ConceptWorld) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    names = [c.concept.name for c in learned]
    scores, images = {}, {}
    for item in learned:
        scores[item.concept.name], images[item.concept.name] = judge_concept(
            composer, item, partner_of(item.concept, names, concept_world), config, oracle)
    return scores, images


def control_rates(composer: Composer, chosen: list[Concept], config: ProtocolConfig,
                  oracle: Oracle) -> dict[str, float]:
    """Prompts for each concept's closest generic object: how often the oracle still names the concept."""
    prompts, expected = [], []
    for concept in chosen:
        for bg in config.backgrounds:
            prompts += [world.caption(concept.control, bg)] * config.samples_per_prompt
            expected += [concept.name] * config.samples_per_prompt
    verdict = judge(oracle, composer.sample(prompts, [config.seed * 1000 + i for i in range(len(prompts))]))
    strict = [verdict.confident("concept", name)[i] for i, name in enumerate(expected)]
    return {"false_positive": _rate([p == e for p, e in zip(verdict.predictions["concept"], expected)]),
            "false_positive_strict": _rate(strict)}


def generic_looks(config: ProtocolConfig) -> list[tuple[world.Look, str]]:
    rng = np.random.default_rng([config.seed, 6])
    return [(world.random_look(rng), str(rng.choice(list(world.BACKGROUNDS)))) for _ in range(config.generic_prompts)]


def generic_accuracy(composer: Composer, config: ProtocolConfig, oracle: Oracle) -> dict[str, float]:
    """Q5: does the model still draw what an ordinary prompt asks for? Per attribute, and all four at once."""
    looks = generic_looks(config)
    verdict = judge(oracle, composer.sample([world.caption(look, bg) for look, bg in looks],
                                            [config.seed * 1000 + i for i in range(len(looks))]))
    truth = {"shape": [look.shape for look, _ in looks], "colour": [look.colour for look, _ in looks],
             "pattern": [look.pattern for look, _ in looks], "background": [bg for _, bg in looks]}
    hits = {head: [p == t for p, t in zip(verdict.predictions[head], values)] for head, values in truth.items()}
    scores = {head: _rate(flags) for head, flags in hits.items()}
    scores["all"] = _rate([all(flags) for flags in zip(*hits.values())])
    return scores


def matrix(stages: list[dict[str, dict]], names: list[str], key: str) -> list[list[float | None]]:
    """[task][concept]: the score after each task, None for concepts not learned yet."""
    return [[stage[name].get(key) if name in stage else None for name in names] for stage in stages]


def forgetting(stages: list[dict[str, dict]], names: list[str]) -> float | None:
    """Mean over all but the last learned concept of (best accuracy before the last task − final accuracy)."""
    drops = [max(stage[name]["acc"] for stage in stages[:-1] if name in stage) - stages[-1][name]["acc"]
             for name in names[:len(stages) - 1]]
    return float(np.mean(drops)) if drops else None


def summary(stages: list[dict[str, dict]], names: list[str]) -> dict:
    final = stages[-1]

    def mean(key: str) -> float:
        return _rate([final[n][key] for n in final if final[n].get(key) is not None])

    return {"final_acc": mean("acc"), "final_strict": mean("strict"), "final_context": mean("context"),
            "final_garbage": mean("garbage"), "final_weight_right": mean("weight_right"),
            "final_weight_partner": mean("weight_partner"), "final_partner_rate": mean("partner_rate"),
            "forgetting": forgetting(stages, names),
            **{key: matrix(stages, names, key) for key in ("acc", "strict", "context", "weight_right",
                                                         "weight_partner", "partner_rate")}}


def composition_modes(method: str) -> tuple[str, ...]:
    """How a method's tasks are composed at sampling time, the first as reported. Methods that train a task on top
    of the earlier ones (c-lora, finetune) sum all tasks at weight 1 (`fixed`), as in the C-LoRA paper; cidm routes
    with the product's default, `named` (the tasks the prompt names, at full strength), and is also judged with the
    paper's `elastic` weights (EWA). Every method is judged under the other's rule too (issue #33: routing apart
    from consolidation): summed methods under `named`, routed ones summed."""
    if method == SHARED:  # one LoRA for every concept: summing or mixing it with itself means nothing
        return ("named",)
    return ("fixed", "named") if CONSOLIDATORS[method].uses_old_in_forward else ("named", "elastic", "fixed")


def judge_tasks(setup: Setup, learned: list[LearnedConcept], config: ProtocolConfig, mode: str,
                log: Callable[[str], None], method: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """`learned`'s tasks composed under `mode`, judged after each task (its first k tasks after task k) as the
    protocol judges a method: (summary scores with generic accuracy and `composition`, the last stage's samples,
    the judged stages' Composer after the last task for further judging)."""
    names = [item.concept.name for item in learned]
    stages = []
    for count in range(1, len(learned) + 1):
        composer = Composer(setup, composed(method, learned[:count]), config, mode=mode)
        stage, images = judge_stage(composer, learned[:count], config, setup.oracle, setup.world)
        stages.append(stage)
        log(f"{method} ({mode}): task {count}/{len(learned)} ({names[count - 1]}), acc "
            + " ".join(f"{n} {stage[n]['acc']:.2f}" for n in stage))
    scores = {**summary(stages, names), "composition": mode, "generic": generic_accuracy(composer, config,
                                                                                         setup.oracle)}
    return scores, images, composer


def run_method(setup: Setup, method: str, config: ProtocolConfig, log: Callable[[str], None]) -> MethodRun:
    """Trains `method`'s tasks one after the other, then judges them under each of `composition_modes(method)`,
    the first as reported (with controls and compositions), the others in `other_compositions`."""
    started = time.monotonic()
    trainers, learned = [], []
    for index in range(config.tasks):
        trainer, item = learn(setup, index, learned, method, config)
        trainers.append(trainer)
        learned.append(item)
        log(f"{method}: task {index + 1}/{config.tasks} ({item.concept.name}) trained, "
            f"{time.monotonic() - started:.0f} s")
    modes = composition_modes(method)
    judged = {mode: judge_tasks(setup, learned, config, mode, log, method) for mode in modes}
    scores, kept_images, composer = judged[modes[0]]
    scores["control"] = control_rates(composer, [c.concept for c in learned], config, setup.oracle)
    scores["regions"], region_samples = judge_regions(
        region_pairs(learned, setup.world),
        lambda a, b, prompts, seeds, boxes: composer.sample_regions(prompts, seeds, boxes), config, setup.oracle)
    scores["other_compositions"] = {mode: judged[mode][0] for mode in modes[1:]}
    scores["seconds"] = time.monotonic() - started
    scores["trainer"] = f"{type(trainers[0]).__module__}.{type(trainers[0]).__qualname__}"
    scores["consolidator"] = "none (one LoRA trained on)" if method == SHARED else \
        type(trainers[-1].consolidator).__name__
    return MethodRun(trainers, learned, scores, kept_images, region_samples)


def oracle_routed_pair(setup: Setup, config: ProtocolConfig) -> PairSampler:
    """Samples a pair with the two concepts' own LoRAs (trained alone) under `named` routing: each region applies
    only the concept its prompt names, the global prompt the concepts it names (both, or none); oracle routing per
    region."""
    def sample(a: LearnedConcept, b: LearnedConcept, prompts: list[tuple[str, str, str]], seeds: list[int],
               boxes: tuple[tuple[float, float, float, float], ...]) -> torch.Tensor:
        return Composer(setup, [a, b], config, mode="named").sample_regions(prompts, seeds, boxes)
    return sample


def upper_bound_judging(config: ProtocolConfig) -> ProtocolConfig:
    """The settings a concept trained alone is judged with (the upper bound, the learnability probe):
    `upper_bound_samples_per_prompt` seeds per background instead of `samples_per_prompt`."""
    return dataclasses.replace(config, samples_per_prompt=config.upper_bound_samples_per_prompt)


def run_upper_bound(setup: Setup, config: ProtocolConfig, log: Callable[[str], None]) -> MethodRun:
    """Each concept's own LoRA, trained with no other task and sampled alone (fixed weight 1) on
    `config.upper_bound_samples_per_prompt` seeds per background; and the composition upper bound: every region pair
    with each tile under its own concept's LoRA only (`oracle_routed_pair`)."""
    trainers, learned, scores, images = [], [], {}, {}
    judged = upper_bound_judging(config)
    started = time.monotonic()
    for index in range(config.tasks):
        trainer, item = learn(setup, index, [], "finetune", config)
        trainers.append(trainer)
        learned.append(item)
        composer = Composer(setup, [item], config, mode="fixed")
        name = item.concept.name
        scores[name], images[name] = judge_concept(composer, item, None, judged, setup.oracle)
        log(f"{UPPER_BOUND}: {name} acc {scores[name]['acc']:.2f}")
    names = list(scores)
    result = {"acc": [scores[n]["acc"] for n in names], "strict": [scores[n]["strict"] for n in names],
              "context": [scores[n]["context"] for n in names],
              "final_acc": _rate([scores[n]["acc"] for n in names]),
              "final_strict": _rate([scores[n]["strict"] for n in names]),
              "final_context": _rate([scores[n]["context"] for n in names]),
              "seconds": time.monotonic() - started}
    result["regions"], region_samples = judge_regions(region_pairs(learned, setup.world),
                                                      oracle_routed_pair(setup, config), config, setup.oracle)
    return MethodRun(trainers, learned, result, images, region_samples)


def kept_run(folder: Path | None, method: str, compute: Callable[[], MethodRun],
             log: Callable[[str], None]) -> MethodRun:
    """`compute()`, or its scores and samples as kept in `folder` by an earlier run with the same key. A finished
    method is kept at once, so that a run stopped part-way resumes at the first unfinished method."""
    if folder is None:
        return compute()
    slug = method.replace(" ", "-")
    scores_path, samples_path = folder / f"{slug}.json", folder / f"{slug}.safetensors"
    if scores_path.exists() and samples_path.exists():
        log(f"{method}: finished in an earlier run, taken from {folder}")
        kept = load_file(samples_path)
        return MethodRun([], [], json.loads(scores_path.read_text()),
                         {k: v for k, v in kept.items() if not k.startswith(REGION_PREFIX)},
                         {k[len(REGION_PREFIX):]: v for k, v in kept.items() if k.startswith(REGION_PREFIX)})
    run = compute()
    models.save_atomically(run.samples | {REGION_PREFIX + name: images for name, images in run.region_samples.items()},
                           samples_path)
    scores_path.write_text(json.dumps(run.scores))  # last: its presence marks the method finished
    return run


def run_methods(setup: Setup, config: ProtocolConfig, runs: list[str], log: Callable[[str], None],
                finished: Path | None) -> dict[str, MethodRun]:
    """The named runs (methods of `config.methods`, or UPPER_BOUND), each kept in `finished` once done."""
    computed = {}
    for name in runs:
        compute = (functools.partial(run_upper_bound, setup, config, log) if name == UPPER_BOUND
                   else functools.partial(run_method, setup, name, config, log))
        computed[name] = kept_run(finished, name, compute, log)
    return computed


def run_protocol(setup: Setup, config: ProtocolConfig, log: Callable[[str], None] = print,
                 finished: Path | None = None) -> tuple[dict, dict[str, MethodRun]]:
    """All methods plus the upper bound; returns the JSON-ready results and each method's run (see `kept_run` for
    `finished`)."""
    names = setup.world.names()[:config.tasks]
    base = Composer(setup, [], config)
    results = {"config": dataclasses.asdict(config), "concepts": names, "world_seed": setup.world.seed,
               "same_shape_pairs": [p for p in setup.world.same_shape_pairs() if set(p) <= set(names)],
               "base": {"control": control_rates(base, list(setup.world.concepts[:config.tasks]), config,
                                                 setup.oracle),
                        "generic": generic_accuracy(base, config, setup.oracle)}}
    runs = run_methods(setup, config, [*config.methods, UPPER_BOUND], log, finished)
    results["methods"] = {method: runs[method].scores for method in config.methods}
    results[UPPER_BOUND] = runs[UPPER_BOUND].scores
    return results, runs
