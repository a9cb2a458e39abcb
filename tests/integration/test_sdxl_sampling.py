"""Sampling on SDXL in the real server (issue 30, items 4, 5 and 7) with the generated `sdxl-blocks` checkpoint
(70 cross-attention layers, two text towers): CIDM Text Encode on both towers with the pooled output, `named`
routing, a stock negative batched into one UNet call per step, regions over all 70 layers, Inspect Aggregation
Weights, chained libraries, the Context-Controlled Guider, and a library of the other family refused naming both.
Each SDXL UNet step costs seconds on a CPU, so every run is one or two steps at 64²."""

import re

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from comfy_host import Graph
from pack_workflows import CKPT
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

LIBRARY = "sdxl-routing"
SAMPLER = dict(steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)


@pytest.fixture(scope="module")
def sdxl(comfy, sdxl_checkpoint):
    root = comfy.workspace / "models" / "cidm"
    checkpoints = comfy.workspace / "models" / "checkpoints"
    synthesize_library(checkpoints / sdxl_checkpoint, root / LIBRARY, ["dog", "duck"], lora_std=0.2)
    synthesize_library(checkpoints / CKPT, root / "sd15-for-sdxl", ["cat"])
    synthesize_library(checkpoints / sdxl_checkpoint, root / "sdxl-routing-b", ["bird"], seed=5, lora_std=0.2)
    return sdxl_checkpoint


class Scene:
    """An SDXL graph: the test loader's MODEL, CLIP and VAE, a 64² latent and helpers."""

    def __init__(self, checkpoint, library=LIBRARY, aggregate=True, count=None):
        self.graph = Graph()
        loaded = self.graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=checkpoint)
        self.model, self.clip = loaded[0], loaded[1]
        self.library = self.graph.add("CIDM_LoadConceptLibrary", library=library)[0]
        if aggregate:
            self.model = self.graph.add("CIDM_ElasticAggregateLoRAs", model=self.model, library=self.library,
                                        tasks="all", scale=1.0, mode="named", weights="",
                                        uncond_weights="match cond")[0]
        if count:
            self.model = self.graph.add("CIDMTest_CountUNetCalls", model=self.model, tag=count)[0]
        self.latent = self.graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)[0]

    def cidm(self, text):
        return self.graph.add("CIDM_TextEncode", clip=self.clip, library=self.library, text=text)[0]

    def stock(self, text, sdxl=False):
        if sdxl:
            return self.graph.add("CLIPTextEncodeSDXL", clip=self.clip, width=64, height=64, crop_w=0, crop_h=0,
                                  target_width=64, target_height=64, text_g=text, text_l=text)[0]
        return self.graph.add("CLIPTextEncode", clip=self.clip, text=text)[0]

    def save(self, tag, positive, negative, model=None, regions=None, **sampling):
        common = dict(model=model or self.model, positive=positive, negative=negative, latent_image=self.latent,
                      seed=3, **{**SAMPLER, **sampling})
        if regions is None:
            sampled = self.graph.add("KSampler", **common)[0]
        else:
            sampled = self.graph.add("CIDM_ContextControlledKSampler", **common, regions=regions, alpha=1.0)[0]
        self.graph.add("CIDMTest_SaveLatent", samples=sampled, tag=tag)


def latent(comfy, tag):
    return load_file(str(comfy.workspace / "output" / f"{tag}.safetensors"))["samples"]


def test_a_prompt_naming_no_concept_is_the_base_model_and_a_named_one_is_not(comfy, sdxl):
    scene = Scene(sdxl)
    plain = scene.graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=sdxl)[0]
    negative = scene.stock("blurry")
    scene.save("sdxl_stock", scene.stock("a photo of a dog"), negative, model=plain)
    scene.save("sdxl_none", scene.cidm("a photo of a dog"), negative)
    scene.save("sdxl_dog", scene.cidm("a photo of a <dog>"), negative)
    comfy.run(scene.graph.prompt())
    stock, none, dog = (latent(comfy, tag) for tag in ("sdxl_stock", "sdxl_none", "sdxl_dog"))
    assert np.isfinite(dog).all() and dog.shape == (1, 4, 8, 8)
    np.testing.assert_array_equal(none, stock)
    assert np.abs(dog - none).mean() > 1e-3, "the named concept had no effect"


@pytest.mark.parametrize("negative_kind", ["CLIPTextEncode", "CLIPTextEncodeSDXL"])
def test_cidm_positive_and_stock_negative_run_as_one_batched_unet_call_per_step(comfy, sdxl, negative_kind):
    tag = f"sdxl_batched_{negative_kind}"
    scene = Scene(sdxl, count=tag)
    scene.save(tag, scene.cidm("a photo of a <dog>"), scene.stock("blurry", sdxl=negative_kind != "CLIPTextEncode"))
    comfy.run(scene.graph.prompt())
    calls = re.findall(rf"CIDM-TEST-UNET {tag} batch=(\d+) cond_or_uncond=\[([\d, ]+)\]", comfy.log())
    assert len(calls) == SAMPLER["steps"], calls
    assert all(batch == "2" and sorted(kinds.split(", ")) == ["0", "1"] for batch, kinds in calls), calls


def test_regions_cover_all_seventy_layers(comfy, sdxl):
    """A region holding the global prompt over the whole canvas is the plain global prompt in every layer (the
    region path's arithmetic equals ordinary attention at both SDXL attention resolutions); two regions with two
    concepts change the image."""
    scene = Scene(sdxl)
    positive, negative = scene.cidm("a <dog> and a <duck>"), scene.stock("blurry")

    def region(conditioning, x, width, previous=None):
        extra = {"regions": previous} if previous is not None else {}
        return scene.graph.add("CIDM_RegionCondition", conditioning=conditioning, x=x, y=0.0, width=width,
                               height=1.0, strength=1.0, **extra)[0]

    scene.save("sdxl_regions_none", positive, negative, regions=None, steps=1)
    scene.save("sdxl_regions_everywhere", positive, negative, regions=region(positive, 0.0, 1.0), steps=1)
    two = region(scene.cidm("a photo of a <duck>"), 0.5, 0.5, previous=region(scene.cidm("a photo of a <dog>"),
                                                                              0.0, 0.5))
    scene.save("sdxl_regions_two", positive, negative, regions=two, steps=1)
    comfy.run(scene.graph.prompt())
    none, everywhere, two = (latent(comfy, f"sdxl_regions_{tag}") for tag in ("none", "everywhere", "two"))
    np.testing.assert_allclose(everywhere, none, atol=1e-3 * np.abs(none).max())
    assert np.abs(two - none).mean() > 1e-3, "region-aware attention had no effect"


def test_inspect_shows_seventy_layers(comfy, sdxl):
    scene = Scene(sdxl, aggregate=False)
    inspect = scene.graph.add("CIDM_InspectAggregationWeights", clip=scene.clip, library=scene.library,
                              text="a photo of a <duck>", tasks="all", mode="named", weights="")
    outputs = comfy.run(scene.graph.prompt())["outputs"][inspect.id]
    table = "".join(outputs["text"])
    rows = re.findall(r"^\s*\d+ \| (\S+) \| (\S+)$", table, flags=re.M)
    assert "layer | 1:dog | 2:duck" in table and rows == [("0.000", "1.000")] * 70, table


def test_a_library_of_the_other_family_is_refused_naming_both(comfy, sdxl):
    scene = Scene(sdxl, library="sd15-for-sdxl")
    scene.save("never", scene.stock("a photo"), scene.stock("blurry"))
    error = comfy.run_expecting_error(scene.graph.prompt())
    assert "model:" in error and "SD1.5-family" in error and "SDXL-family" in error, error


def test_chained_libraries_both_apply_and_the_guider_samples_as_the_sampler(comfy, sdxl):
    """A second library's aggregate chained after the first (fixed weight 1) changes the image on SDXL, and the
    Context-Controlled Guider under SamplerCustomAdvanced samples the regions exactly as the Context-Controlled
    KSampler does."""
    scene = Scene(sdxl)
    second = scene.graph.add("CIDM_LoadConceptLibrary", library="sdxl-routing-b")[0]
    chained = scene.graph.add("CIDM_ElasticAggregateLoRAs", model=scene.model, library=second, tasks="all",
                              scale=1.0, mode="fixed", weights="1", uncond_weights="match cond")[0]
    positive, negative = scene.cidm("a photo of a <dog>"), scene.stock("blurry")
    scene.save("sdxl_first", positive, negative, steps=1)
    scene.save("sdxl_chained", positive, negative, model=chained, steps=1)
    regions = scene.graph.add("CIDM_RegionCondition", conditioning=scene.cidm("a photo of a <duck>"), x=0.5,
                              y=0.0, width=0.5, height=1.0, strength=1.0)[0]
    scene.save("sdxl_region_sampler", positive, negative, regions=regions, steps=1)
    guider = scene.graph.add("CIDM_ContextControlledGuider", model=scene.model, positive=positive, negative=negative,
                             regions=regions, cfg=SAMPLER["cfg"], alpha=1.0)[0]
    sigmas = scene.graph.add("BasicScheduler", model=scene.model, scheduler=SAMPLER["scheduler"], steps=1,
                             denoise=1.0)[0]
    sampled = scene.graph.add("SamplerCustomAdvanced", noise=scene.graph.add("RandomNoise", noise_seed=3)[0],
                              guider=guider, sampler=scene.graph.add("KSamplerSelect", sampler_name="euler")[0],
                              sigmas=sigmas, latent_image=scene.latent)[0]
    scene.graph.add("CIDMTest_SaveLatent", samples=sampled, tag="sdxl_region_guider")
    comfy.run(scene.graph.prompt())
    first, chained_latent = latent(comfy, "sdxl_first"), latent(comfy, "sdxl_chained")
    assert np.isfinite(chained_latent).all() and np.abs(chained_latent - first).mean() > 1e-3
    np.testing.assert_array_equal(latent(comfy, "sdxl_region_guider"), latent(comfy, "sdxl_region_sampler"))


def test_automatic_regions_read_the_sdxl_layers_at_a_quarter_of_the_latent(comfy, sdxl):
    """Issue 31, item 5: the probe picks SDXL's layers by their grid (a 128×64 image: a 16×8 latent, a 4×2 grid in
    the 32² stage of a 1024² image), so two named concepts get two disjoint regions on SDXL too."""
    scene = Scene(sdxl)
    scene.latent = scene.graph.add("EmptyLatentImage", width=128, height=64, batch_size=1)[0]
    sampler = scene.graph.add("CIDM_ContextControlledKSampler", model=scene.model,
                              positive=scene.cidm("a <dog> and a <duck> on a beach"), negative=scene.stock("blurry"),
                              latent_image=scene.latent, seed=3, alpha=1.0, auto_regions=True, probe_steps=0.5,
                              **SAMPLER)
    masks = scene.graph.add("MaskToImage", mask=sampler[1])[0]
    scene.graph.add("SaveImage", images=masks, filename_prefix="sdxl_auto_masks")
    entry = comfy.run(scene.graph.prompt())
    assert "text" not in entry["outputs"].get(sampler.id, {}), entry["outputs"][sampler.id]["text"]
    saved = sorted(p for p in comfy.output_files(entry) if p.name.startswith("sdxl_auto_masks"))
    found = [np.asarray(Image.open(p))[..., 0] > 127 for p in saved]
    assert len(found) == 2 and all(m.shape == (64, 128) and m.any() for m in found)
    assert not (found[0] & found[1]).any()
