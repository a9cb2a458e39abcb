"""Region Condition and Context-Controlled KSampler in the real server."""

import numpy as np
import pytest

from comfy_host import Graph
from pack_workflows import CKPT, pixels
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

LIBRARY = "regions"


@pytest.fixture(scope="module")
def library(comfy):
    synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, comfy.workspace / "models" / "cidm" / LIBRARY,
                       ["dog", "duck"])
    return LIBRARY


def compose(comfy, alpha: float, with_regions: bool = True, sampler: str = "context") -> np.ndarray:
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=LIBRARY)
    model = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], tasks="all", scale=0.8,
                      mode="elastic", weights="", uncond_weights="match cond")[0]

    def encode(text):
        return graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text=text)[0]

    positive, negative = encode("a <dog> and a <duck> on a beach"), encode("blurry")
    latent = graph.add("EmptyLatentImage", width=128, height=64, batch_size=1)[0]
    common = dict(model=model, positive=positive, negative=negative, latent_image=latent, seed=5, steps=3, cfg=6.0,
                  sampler_name="euler", scheduler="normal", denoise=1.0)
    if sampler == "stock":
        sampled = graph.add("KSampler", **common)
    else:
        regions = {}
        if with_regions:
            left = graph.add("CIDM_RegionCondition", conditioning=encode("a photo of a <dog>"), x=0.0, y=0.0,
                             width=0.5, height=1.0, strength=1.0)
            right = graph.add("CIDM_RegionCondition", conditioning=encode("a photo of a <duck>"), x=0.5, y=0.0,
                              width=0.5, height=1.0, strength=1.0, regions=left[0])
            regions = {"regions": right[0]}
        sampled = graph.add("CIDM_ContextControlledKSampler", alpha=alpha, **common, **regions)
    decoded = graph.add("VAEDecode", samples=sampled[0], vae=checkpoint[2])
    graph.add("SaveImage", images=decoded[0], filename_prefix=f"regions_{sampler}_{alpha}_{with_regions}")
    return pixels(comfy, comfy.run(graph.prompt()))


def test_regions_change_the_composition_and_alpha_one_is_the_global_prompt(comfy, library):
    stock = compose(comfy, 1.0, sampler="stock")
    assert stock.shape == (64, 128, 3)
    no_regions = compose(comfy, 0.1, with_regions=False)
    assert np.abs(no_regions - stock).mean() < 1.0, "without regions the sampler must match the stock KSampler"
    global_only = compose(comfy, 1.0)
    assert np.abs(global_only - stock).mean() < 1.0, "alpha = 1 keeps the global prediction everywhere"
    composed = compose(comfy, 0.1)
    assert np.abs(composed - stock).mean() > 0.5, "region prompts had no effect"


def test_empty_region_box_names_the_input(comfy, library):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    cond = graph.add("CLIPTextEncode", clip=checkpoint[1], text="a dog")
    region = graph.add("CIDM_RegionCondition", conditioning=cond[0], x=0.2, y=0.0, width=0.0, height=1.0,
                       strength=1.0)
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = graph.add("CIDM_ContextControlledKSampler", model=checkpoint[0], positive=cond[0], negative=cond[0],
                        regions=region[0], latent_image=latent[0], seed=0, steps=1, cfg=1.0, sampler_name="euler",
                        scheduler="normal", denoise=1.0, alpha=0.1)
    graph.add("SaveLatent", samples=sampled[0], filename_prefix="never_written")
    error = comfy.run_expecting_error(graph.prompt())
    assert "width" in error and "empty" in error
