"""Region nodes: Region Condition, Context-Controlled KSampler and Context-Controlled Guider."""

from __future__ import annotations

import logging
import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..cidm.auto_regions import (AttentionProbe, AutoMasks, ProbeSettings, auto_masks, latent_masks,
                                 probe_grid)
from ..cidm.errors import CIDMInputError, require_finite
from ..cidm.names import name_key
from ..cidm.plots import region_layout
from ..cidm.routing import PROMPT_KEY, REGION_PREFIX, RunCache, only_concept
from ..cidm.regions import (BOX_UNITS, RegionPlan, RegionSpec, blend_region_predictions, crop_box, make_regions,
                            mask_at, region_weights)
from .host.family import model_family
from .host.model import weights_fixed_for_run
from .host.regions import PLAN_KEY, PROBE_KEY, HostProbe, with_region_attention

CATEGORY = "CIDM/regions"
RegionsType = io.Custom("CIDM_REGIONS")


def region_label(conditioning) -> str:
    """The concept tokens a region's prompt names, as CIDM Text Encode records them (cidm.routing.LayerwisePrompt;
    '' for other conditionings)."""
    prompts = [extra.get(PROMPT_KEY) for _, extra in conditioning]
    return " ".join(dict.fromkeys(token for prompt in prompts if prompt is not None for token in prompt.tokens))


class RegionCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_RegionCondition", display_name="Region Condition", category=CATEGORY,
            description="One region of the image with its own prompt (encode it with CIDM Text Encode, e.g. "
                        "'a photo of a <dog>'): inside the region the image follows this prompt and its concepts, "
                        "outside it the global prompt. Draw the region as a MASK (a batch of masks gives one region "
                        "per mask), or give a box. Chain nodes through `regions` to add regions; the layout output "
                        "shows them all.",
            inputs=[io.Conditioning.Input("conditioning", tooltip="The region's prompt."),
                    io.Float.Input("x", default=0.0, min=0.0, max=16384.0, step=0.01,
                                   tooltip="Box left edge, in `units`."),
                    io.Float.Input("y", default=0.0, min=0.0, max=16384.0, step=0.01,
                                   tooltip="Box top edge, in `units`."),
                    io.Float.Input("width", default=0.5, min=0.0, max=16384.0, step=0.01,
                                   tooltip="Box width, in `units`; the box must lie inside the image."),
                    io.Float.Input("height", default=1.0, min=0.0, max=16384.0, step=0.01,
                                   tooltip="Box height, in `units`; the box must lie inside the image."),
                    io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="How strongly the region prompt replaces the global one inside it "
                                           "(multiplies the mask)."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="Overrides the box when connected; stretched over the whole image. A batch "
                                          "of N masks gives N regions with this prompt."),
                    RegionsType.Input("regions", optional=True, tooltip="Earlier regions to add this one to."),
                    io.Combo.Input("units", options=list(BOX_UNITS), default="fraction", optional=True,
                                   tooltip="fraction: x, y, width, height as fractions of the image (0–1). "
                                           "pixels: in pixels of a canvas_width × canvas_height image."),
                    io.Int.Input("canvas_width", default=512, min=8, max=16384, step=8, optional=True,
                                 tooltip="Image width in pixels: pixel boxes are read against it, and the layout "
                                         "preview takes its shape. Regions scale with the latent you sample."),
                    io.Int.Input("canvas_height", default=512, min=8, max=16384, step=8, optional=True,
                                 tooltip="Image height in pixels (see canvas_width).")],
            outputs=[RegionsType.Output(display_name="regions", tooltip="All regions so far, for the "
                                        "Context-Controlled KSampler or Guider."),
                     io.Image.Output(display_name="layout", tooltip="The regions over the canvas, each labelled "
                                     "with the concepts its prompt names.")])

    @classmethod
    def execute(cls, conditioning, x, y, width, height, strength, mask=None, regions=None, units="fraction",
                canvas_width=512, canvas_height=512):
        regions = list(regions or []) + make_regions(conditioning, region_label(conditioning), x, y, width, height,
                                                     strength, units, canvas_width, canvas_height, mask)
        layout = region_layout([r.mask for r in regions], [r.label for r in regions], canvas_width, canvas_height)
        return io.NodeOutput(regions, layout, ui=ui.PreviewImage(layout, cls=cls))


class RegionGuider(comfy.samplers.CFGGuider, RunCache):
    """ComfyUI's CFGGuider with regions (ComfyUI v0.3.75).

    Region-aware cross-attention: the guider's calls carry a cidm RegionPlan in transformer_options, read by the
    attn2 patch of nodes/host/regions.py; the UNet runs once per step, cond and uncond batched as usual, and
    every CFG hook applies since the prediction goes through ComfyUI's own sampling_function.

    Region noise estimation (α < 1): one calc_cond_batch evaluates the global cond, the uncond and every region
    cond, on the area crop around its mask (REGION_NOISE "area crop") or on the whole latent, where ComfyUI batches
    it with cond and uncond into one UNet call ("whole latent"); the region predictions are blended into the cond
    prediction
    (cidm.regions.blend_region_predictions), and the result goes through ComfyUI's pre-CFG hooks and cfg_function
    (sampler_cfg_function and post-CFG hooks), as comfy_extras/nodes_perpneg.py does."""

    def set_regions(self, positive, negative, regions: list[RegionSpec], alpha: float, attention: bool,
                    region_noise: str = "area crop", auto: ProbeSettings | None = None):
        """`auto`: automatic regions (cidm.auto_regions) for the concepts the positive prompt names that no region
        in `regions` names; None, none."""
        self.positive, self.negative, self.user_regions = positive, negative, list(regions)
        self.alpha, self.attention, self.crop = alpha, attention, region_noise == "area crop"
        self.auto, self.probe, self.found, self.automatic, self.targets, self.note = auto, None, [], [], [], ""
        self.use_regions(self.user_regions)

    def use_regions(self, regions: list[RegionSpec]) -> None:
        """The conds and region plan of one sampling run with `regions`; nothing of an earlier run's stays (its
        conds, its crop boxes and blend shares)."""
        conds = {"positive": self.positive, "negative": self.negative}
        conds.update({f"{REGION_PREFIX}{i}": region.conditioning for i, region in enumerate(regions)})
        self.original_conds = {}
        self.inner_set_conds(conds)
        self.forget()
        self.regions, self.plan = list(regions), None
        if self.attention and regions:
            self.plan = RegionPlan([single_prompt(region.conditioning, i) for i, region in enumerate(regions)],
                                   [region.mask for region in regions],
                                   [c["uuid"] for c in self.original_conds["positive"]],
                                   [c["uuid"] for c in self.original_conds["negative"]],
                                   [self.original_conds[f"{REGION_PREFIX}{i}"][0]["uuid"] for i in range(len(regions))])

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        """CFGGuider.sample, with automatic regions when they apply (`sample_auto`); what the run cached (crop
        boxes, blend shares, the plan's device copies) is dropped after it, since a guider, and its plan, can
        outlive the run (a GUIDER output reused by later prompts)."""
        try:
            self.targets, self.note = automatic_targets(self.positive, self.user_regions, self.auto, sigmas,
                                                        denoise_mask)
            self.found, self.automatic = [], []
            if not self.targets:
                return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                      seed)
            return self.sample_auto(self.targets, noise, latent_image, sampler, sigmas, callback, disable_pbar,
                                    seed)
        finally:
            if self.found:  # automatic regions were swapped in: the guider may serve another run
                self.use_regions(self.user_regions)
            self.forget()
            if self.plan is not None:
                self.plan.forget()

    def sample_auto(self, targets, noise, latent_image, sampler, sigmas, callback, disable_pbar, seed):
        """The probe's steps (sigmas[:k + 1]) with an AttentionProbe on the positive prompt, then, per latent of the
        batch, the rest of the run (sigmas[k:], no new noise) with its regions: the user's, plus one per concept of
        `targets` the probe could place, or the user's alone when it could not (logged). Per latent, what the
        probe found (`self.found`, AutoMasks) and the automatic regions made (`self.automatic`). The progress
        callback sees one run of len(sigmas) − 1 steps per latent; a continuation draws its sampler noise from
        seed + 1 + its index, never the probe's stream again."""
        prompt = self.positive[0][1][PROMPT_KEY]
        names = [concept.name for concept in prompt.concepts]
        probed = self.auto.probe_steps(len(sigmas) - 1)
        probe = AttentionProbe([list(c.positions) for c in prompt.concepts],
                               probe_grid(tuple(latent_image.shape[-2:]), self.auto.downscale))
        self.probe = HostProbe(probe, [c["uuid"] for c in self.original_conds["positive"]])
        steps = len(sigmas) - 1

        def progress(offset: int):
            return None if callback is None else (lambda step, x0, x, total: callback(step + offset, x0, x, steps))

        try:
            latent = super().sample(noise, latent_image, sampler, sigmas[:probed + 1], None, progress(0),
                                    disable_pbar, seed)
        finally:
            self.probe = None
        maps = probe.maps()
        outputs = []
        for index in range(latent.shape[0]):
            found = (auto_masks(maps[index], names, self.auto) if maps is not None else
                     AutoMasks(None, "this model has no cross-attention layer at a quarter of the latent's size "
                                     f"({probe.grid[0]}×{probe.grid[1]}), where the probe reads the concepts' maps"))
            self.found.append(found)
            if found.masks is None:
                logging.warning("CIDM: %s", fallback_note(index, found))
            masks = [] if found.masks is None else latent_masks(found.masks, self.auto.downscale,
                                                                tuple(latent.shape[-2:]))
            automatic = [RegionSpec(concept_conditioning(self.positive, concept), mask, 1.0, concept.name)
                         for concept, mask in zip(prompt.concepts, masks) if concept in targets]
            self.automatic.append(automatic)
            self.use_regions(self.user_regions + automatic)
            current = latent[index:index + 1]
            outputs.append(super().sample(torch.zeros_like(current), current, sampler, sigmas[probed:], None,
                                          progress(probed), disable_pbar, None if seed is None else seed + 1 + index))
        return torch.cat(outputs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.plan is not None or self.probe is not None:
            options = dict(model_options.get("transformer_options", {}))
            if self.plan is not None:
                self.plan.static_weights = weights_fixed_for_run(self.model_patcher)
                options[PLAN_KEY] = self.plan
            if self.probe is not None:
                options[PROBE_KEY] = self.probe
            model_options = dict(model_options, transformer_options=options)
        if not self.regions or self.alpha >= 1.0:
            return super().predict_noise(x, timestep, model_options=model_options, seed=seed)
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            negative = None
        size, masks = tuple(x.shape[-2:]), [region.mask for region in self.regions]
        # Crop boxes and blend shares depend on the latent size only: made once, not read back from the device
        # or copied to it in every step (cidm.routing.RunCache).
        region_conds = [self.conds.get(f"{REGION_PREFIX}{i}", []) for i in range(len(masks))]
        if self.crop:
            boxes = self.cached(("crop boxes", size), lambda: [crop_box(mask, *size) for mask in masks])
            region_conds = [[dict(c, area=box) for c in conds] for conds, box in zip(region_conds, boxes)]
        conds = [positive, negative] + region_conds
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        shares = self.cached(("blend shares", size, x.device, x.dtype), lambda: region_weights(masks, *size).to(x))
        cond = blend_region_predictions(out[0], out[2:], shares, self.alpha)
        return comfy.samplers.cfg_function(self.inner_model, cond, out[1], self.cfg, x, timestep,
                                           model_options=model_options, cond=positive, uncond=negative)


def prompt_concepts(conditioning) -> list:
    """The concepts (cidm.routing.NamedConcept) a conditioning's CIDM prompts name."""
    return [concept for _, extra in conditioning for concept in getattr(extra.get(PROMPT_KEY), "concepts", ())]


def automatic_targets(positive, regions: list[RegionSpec], settings: ProbeSettings | None, sigmas,
                      denoise_mask) -> tuple[list, str]:
    """(the concepts of the positive prompt that get an automatic region, a note for the user): every concept it
    names that no region's prompt names, when it names two or more; none without `settings`, for a combined
    positive conditioning, with a noise mask (inpainting keeps the original latent outside the mask, which a
    continued run would replace by the probe's), or with fewer than two steps."""
    if settings is None:
        return [], ""
    concepts = prompt_concepts(positive)
    if len(concepts) < 2:
        return [], "automatic regions: the prompt names fewer than two concepts, so none were made"
    if len(positive) != 1:
        return [], "automatic regions: not made for a combined positive conditioning; draw the regions"
    if denoise_mask is not None:
        return [], "automatic regions: not made with a noise mask (inpainting); draw the regions"
    if len(sigmas) < 3:
        return [], "automatic regions: not made for a run of fewer than two steps"
    drawn = {name_key(concept.name) for region in regions for concept in prompt_concepts(region.conditioning)}
    targets = [concept for concept in concepts if name_key(concept.name) not in drawn]
    return targets, "" if targets else "automatic regions: every concept has a drawn region"


def concept_conditioning(positive, concept):
    """An automatic region's prompt: the positive prompt naming `concept` only (cidm.routing.only_concept)."""
    tensor, extra = positive[0]
    return [[tensor, dict(extra, **{PROMPT_KEY: only_concept(extra[PROMPT_KEY], concept)})]]


def single_prompt(conditioning, index: int):
    """The one conditioning tensor of a region's prompt (region-aware attention takes one prompt per region)."""
    if len(conditioning) != 1:
        raise CIDMInputError("regions", f"region {index + 1} holds {len(conditioning)} prompts (combined "
                                        "conditionings); region-aware attention takes one prompt per region")
    return conditioning[0][0]


def region_guider(model, positive, negative, regions, cfg: float, alpha: float, attention: bool,
                  region_noise: str = "by device", auto: ProbeSettings | None = None) -> RegionGuider:
    """Raises CIDMInputError naming the input for non-finite numbers, and naming `model` when region-aware
    attention cannot run: an attn2 replace patch (IPAdapter and the like) makes ComfyUI's BasicTransformerBlock
    call the projections itself and skip attn2's forward, where the regions are applied."""
    require_finite(cfg=cfg, alpha=alpha)
    region_noise = region_noise_place(region_noise, model.load_device)
    regions = list(regions or [])
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if attention and regions and replaced:
        raise CIDMInputError("model", "another node replaced the cross-attention (an attn2 replace patch, as "
                                      "IPAdapter sets); region-aware attention cannot run inside it. Turn "
                                      "region_attention off and use alpha < 1 (region noise estimation), or sample "
                                      "without that patch")
    if auto is not None and replaced:
        logging.warning("CIDM: automatic regions are off for this model: another node replaced its cross-attention "
                        "(an attn2 replace patch, as IPAdapter sets), where the probe reads the concepts' maps")
        auto = None
    guider = RegionGuider(with_region_attention(model) if auto or attention and regions else model)
    guider.set_regions(positive, negative, regions, alpha, attention, region_noise, auto)
    guider.set_cfg(cfg)
    return guider


def sample(guider: RegionGuider, latent_image: dict, seed: int, steps: int, sampler_name: str, scheduler: str,
           denoise: float) -> dict:
    """What the stock KSampler does (nodes.common_ksampler, comfy.sample.sample), with `guider` in place of the
    plain CFGGuider: the same noise, the same sigmas (comfy.samplers.KSampler: denoise and the dpm_2/uni_pc rule)."""
    require_finite(denoise=denoise)
    model = guider.model_patcher
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
    samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent_image.get("noise_mask"),
                            callback=latent_preview.prepare_callback(model, steps),
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = dict(latent_image)
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out


def fallback_note(index: int, found: AutoMasks) -> str:
    return f"latent {index + 1}: no automatic regions, sampled the rest of the run without them: {found.problem}"


def sampled_regions(guider: RegionGuider, shape, downscale: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(MASK [N, H, W]: each automatic region of each latent at the image's size, zero for a concept the probe could
    not place, or one zero mask when none were made; IMAGE [B, h, w, 3]: each latent's regions, labelled; a note
    for the user, '' when there is nothing to say, also logged)."""
    height, width = shape[-2] * downscale, shape[-1] * downscale
    masks, layouts, notes = [], [], [guider.note] if guider.note else []
    for index, (found, automatic) in enumerate(zip(guider.found, guider.automatic)):
        masks += [mask_at(region.mask, height, width) for region in automatic]
        if found.masks is None:
            masks += [torch.zeros(height, width)] * len(guider.targets)
            notes.append(fallback_note(index, found))
    for automatic in guider.automatic or [[]]:
        regions = guider.user_regions + automatic
        layouts.append(region_layout([r.mask for r in regions], [r.label for r in regions], width, height))
    note = "\n".join(notes)
    return torch.stack(masks) if masks else torch.zeros(1, height, width), torch.cat(layouts), note


def guider_inputs():
    return [io.Model.Input("model", tooltip="The model to sample, e.g. from Elastic Aggregate LoRAs."),
            io.Conditioning.Input("positive", tooltip="The global prompt."),
            io.Conditioning.Input("negative", tooltip="The negative prompt (CIDM Text Encode or CLIPTextEncode)."),
            RegionsType.Input("regions", optional=True, tooltip="From Region Condition; none gives plain sampling.")]


ALPHA = io.Float.Input("alpha", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Region noise estimation (CIDM Eq. 5): below 1, each region's prompt is also "
                               "predicted (see region_noise_on) and blended in with weight 1 − alpha inside its "
                               "mask (the paper uses 0.1). 1 turns it off.")
ATTENTION = io.Boolean.Input("region_attention", default=True, optional=True,
                             tooltip="Region-aware cross-attention: image tokens inside a region attend to that "
                                     "region's prompt through only its concepts' LoRAs, the rest to the global "
                                     "prompt; one UNet call per step.")
REGION_NOISE_ON = ("by device", "area crop", "whole latent")
REGION_NOISE = io.Combo.Input("region_noise_on", options=list(REGION_NOISE_ON), default="by device", optional=True,
                              tooltip="Where region noise estimation (alpha < 1) predicts each region. area crop: on "
                                      "the crop around its mask, so its cost follows the region's area (cheaper "
                                      "where compute dominates: a CPU, 1.42x the stock KSampler at 512²). whole "
                                      "latent: on the whole image, batched with the global prompt into one UNet "
                                      "call per step (cheaper where a call's fixed cost dominates: on an H200 "
                                      "1.26-1.72x against 2.25-2.29x for area crops); the region's prediction then "
                                      "also sees the rest of the image, so the two give different images. by "
                                      "device: area crop on a CPU, whole latent on a GPU.")


def region_noise_place(choice: str, device) -> str:
    """The REGION_NOISE_ON choice to run: "by device" resolves to "area crop" on a CPU and "whole latent" on any
    other device (README, Benchmarks: the cheaper one on each).

    Raises:
        CIDMInputError: ("region_noise_on") for an unknown choice.
    """
    if choice not in REGION_NOISE_ON:
        raise CIDMInputError("region_noise_on", f"unknown choice {choice!r}; supported: {', '.join(REGION_NOISE_ON)}")
    if choice != "by device":
        return choice
    return "area crop" if getattr(device, "type", str(device)) == "cpu" else "whole latent"


AUTO_REGIONS = io.Boolean.Input("auto_regions", default=False, optional=True,
                                tooltip="When the positive prompt names two or more concepts, each concept that no "
                                        "Region Condition names gets its own region, found from where its tokens "
                                        "draw attention in the first steps of this run (probe_steps; no extra "
                                        "steps). The masks and the layout come out as outputs. If the probe cannot "
                                        "tell the concepts apart, it says so and samples the rest of the run "
                                        "without regions. Off by "
                                        "default: in the toy world, where it can be measured, concept tokens do not "
                                        "show where their object is (README, Automatic regions); check the layout "
                                        "output on your model, or draw the regions.")
PROBE_STEPS = io.Float.Input("probe_steps", default=ProbeSettings().steps, min=0.05, max=0.9, step=0.05,
                             optional=True,
                             tooltip="The share of the steps sampled before the regions are read (at least one "
                                     "step). More: the layout is more settled when read, but the regions act on "
                                     "fewer steps.")
CFG = io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                     tooltip="Classifier-free guidance scale, as in KSampler.")


class ContextControlledKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ContextControlledKSampler", display_name="Context-Controlled KSampler",
            category=CATEGORY,
            description="The KSampler with regions. Inside each region the image follows the region's prompt "
                        "and only its concepts (region-aware cross-attention, one UNet call per step); outside "
                        "every region, the global prompt. alpha below 1 adds CIDM's region noise estimation. "
                        "With auto_regions on, a prompt naming two or more concepts needs no drawn region: "
                        "each concept without one finds its own place (the masks and the layout are outputs). "
                        "With auto_regions off and no region drawn, it is the stock KSampler, bit for bit, CFG "
                        "model patches (RescaleCFG, ...) included.",
            inputs=guider_inputs() + [
                io.Latent.Input("latent_image", tooltip="The latent to denoise (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed, as in KSampler."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampling steps."), CFG,
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="dpmpp_2m",
                               tooltip="The sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="karras",
                               tooltip="The noise schedule, as in KSampler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: from pure noise; less keeps more of latent_image."), ALPHA, ATTENTION,
                REGION_NOISE, AUTO_REGIONS, PROBE_STEPS],
            outputs=[io.Latent.Output(display_name="latent"),
                     io.Mask.Output(display_name="auto_masks", tooltip="The automatic regions, one mask per concept "
                                    "(and per latent of the batch), at the image's size; empty where none were "
                                    "made."),
                     io.Image.Output(display_name="layout", tooltip="The regions each latent was sampled with, "
                                     "labelled with their concepts.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                alpha, regions=None, region_attention=True, region_noise_on="by device", auto_regions=False,
                probe_steps=ProbeSettings().steps):
        auto = ProbeSettings(steps=probe_steps) if auto_regions else None
        guider = region_guider(model, positive, negative, regions, cfg, alpha, region_attention, region_noise_on, auto)
        latent = sample(guider, latent_image, seed, steps, sampler_name, scheduler, denoise)
        masks, layout, note = sampled_regions(guider, latent["samples"].shape, model_family(model).vae_downscale)
        shown = ui.PreviewImage(layout, cls=cls).as_dict()
        return io.NodeOutput(latent, masks, layout, ui={**shown, **ui.PreviewText(note).as_dict()} if note else shown)


class ContextControlledGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ContextControlledGuider", display_name="Context-Controlled Guider", category=CATEGORY,
            description="The Context-Controlled KSampler's guidance as a GUIDER, for SamplerCustomAdvanced "
                        "(bring your own noise, sampler and sigmas). Automatic regions run inside it too; their "
                        "masks are outputs of the KSampler only (here a fallback goes to the log).",
            inputs=guider_inputs() + [CFG, ALPHA, ATTENTION, REGION_NOISE, AUTO_REGIONS, PROBE_STEPS],
            outputs=[io.Guider.Output(display_name="guider")])

    @classmethod
    def execute(cls, model, positive, negative, cfg, alpha, regions=None, region_attention=True,
                region_noise_on="by device", auto_regions=False, probe_steps=ProbeSettings().steps):
        auto = ProbeSettings(steps=probe_steps) if auto_regions else None
        return io.NodeOutput(region_guider(model, positive, negative, regions, cfg, alpha, region_attention,
                                           region_noise_on, auto))


NODES = [RegionCondition, ContextControlledKSampler, ContextControlledGuider]
