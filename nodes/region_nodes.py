"""Region nodes: Region Condition and Context-Controlled KSampler (region noise estimation)."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..cidm.regions import RegionSpec, blend_region_predictions, box_mask, mask_at

CATEGORY = "CIDM/regions"
RegionsType = io.Custom("CIDM_REGIONS")


class RegionCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_RegionCondition", display_name="Region Condition", category=CATEGORY,
            description="One region of the image with its own prompt (encode it with CIDM Text Encode, e.g. "
                        "'a photo of a <dog>'). Draw the region as a MASK, or give a box as fractions of the "
                        "image. Chain nodes to add regions.",
            inputs=[io.Conditioning.Input("conditioning", tooltip="The region's prompt."),
                    io.Float.Input("x", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Box left (fraction)."),
                    io.Float.Input("y", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Box top (fraction)."),
                    io.Float.Input("width", default=0.5, min=0.0, max=1.0, step=0.01),
                    io.Float.Input("height", default=1.0, min=0.0, max=1.0, step=0.01),
                    io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="How strongly the region prompt replaces the global one inside it."),
                    io.Mask.Input("mask", optional=True, tooltip="Overrides the box when connected."),
                    RegionsType.Input("regions", optional=True, tooltip="Earlier regions to add this one to.")],
            outputs=[RegionsType.Output(display_name="regions")])

    @classmethod
    def execute(cls, conditioning, x, y, width, height, strength, mask=None, regions=None):
        region_mask = mask_at(mask, 64, 64) if mask is not None else box_mask(x, y, width, height)
        return io.NodeOutput(list(regions or []) + [RegionSpec(conditioning, region_mask * strength, strength)])


class RegionGuider(comfy.samplers.CFGGuider):
    """Classifier-free guidance per branch (global and each region), then the region blend of cidm.regions."""

    def set_regions(self, positive, negative, regions: list[RegionSpec], alpha: float):
        conds = {"positive": positive, "negative": negative}
        conds.update({f"region_{i}": region.conditioning for i, region in enumerate(regions)})
        self.inner_set_conds(conds)
        self.regions, self.alpha = regions, alpha

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        names = ["positive", "negative"] + [f"region_{i}" for i in range(len(self.regions))]
        outputs = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds.get(n) for n in names], x, timestep,
                                                 model_options)
        uncond = outputs[1]
        guided = [uncond + self.cfg * (out - uncond) for out in [outputs[0]] + outputs[2:]]
        masks = [mask_at(region.mask, x.shape[-2], x.shape[-1]) for region in self.regions]
        return blend_region_predictions(guided[0], guided[1:], masks, self.alpha)


class ContextControlledKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ContextControlledKSampler", display_name="Context-Controlled KSampler",
            category=CATEGORY,
            description="Samples with a global prompt and region prompts: every region's noise prediction is "
                        "blended into the global one inside its mask (CIDM's region noise estimation).",
            inputs=[io.Model.Input("model"), io.Conditioning.Input("positive", tooltip="The global prompt."),
                    io.Conditioning.Input("negative"), RegionsType.Input("regions", optional=True),
                    io.Latent.Input("latent_image"),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                    io.Int.Input("steps", default=30, min=1, max=10000),
                    io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01),
                    io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="dpmpp_2m"),
                    io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="karras"),
                    io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                    io.Float.Input("alpha", default=0.1, min=0.0, max=1.0, step=0.01,
                                   tooltip="Share of the global prediction inside regions (the paper uses 0.1).")],
            outputs=[io.Latent.Output(display_name="latent")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                alpha, regions=None):
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        guider = RegionGuider(model)
        guider.set_regions(positive, negative, list(regions or []), alpha)
        guider.set_cfg(cfg)
        total_steps = steps if denoise >= 1.0 else int(steps / max(denoise, 1e-4))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler,
                                                 total_steps)[-(steps + 1):]
        callback = latent_preview.prepare_callback(model, steps)
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = dict(latent_image)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out)


NODES = [RegionCondition, ContextControlledKSampler]
