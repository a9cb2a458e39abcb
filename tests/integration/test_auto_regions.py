"""Automatic regions (issue #31) in the real server: the masks as outputs, a drawn region replacing one concept's,
the same masks on a second run and new ones for a new seed, the fallback's message, and a latent whose size is not
a multiple of 64."""

import numpy as np
import pytest

from synthetic import synthesize_library
from test_region_nodes import SAMPLING, concept_graph, images, latents

pytestmark = pytest.mark.integration

CKPT = "cidm_sd15_blocks.safetensors"  # SD1.5's 16 attn2 layers at every resolution: the probe reads 1/4 of the latent
PROMPT = "a <dog> and a <duck> on a beach"
AUTO = dict(alpha=1.0, auto_regions=True, probe_steps=0.34)  # of SAMPLING's 3 steps: 1 probe step


@pytest.fixture(scope="module")
def libraries(comfy):
    root = comfy.workspace / "models" / "cidm"
    checkpoint = comfy.workspace / "models" / "checkpoints" / CKPT
    synthesize_library(checkpoint, root / "auto", ["dog", "duck"], lora_std=0.2)
    synthesize_library(checkpoint, root / "auto_twins", ["dog", "duck"], lora_std=0.2, twins=True)
    return {"distinct": "auto", "twins": "auto_twins"}


def sampler_graph(library: str, width=256, height=128, regions=None, batch_size=1, **settings):
    """(graph, the Context-Controlled KSampler's node) sampling PROMPT with `library`'s concepts; its latent, masks
    and layout are saved under the prefixes latent, masks and layout."""
    graph, model, encode, negative = concept_graph(CKPT, library, "cidm", scale=1.0, mode="named")
    latent = graph.add("EmptyLatentImage", width=width, height=height, batch_size=batch_size)[0]
    extra = {} if regions is None else {"regions": regions(graph, encode)}
    sampler = graph.add("CIDM_ContextControlledKSampler", model=model, positive=encode(PROMPT), negative=negative,
                        latent_image=latent, **{**SAMPLING, **AUTO, **settings}, **extra)
    graph.add("SaveLatent", samples=sampler[0], filename_prefix="latent")
    graph.add("SaveImage", images=graph.add("MaskToImage", mask=sampler[1])[0], filename_prefix="masks")
    graph.add("SaveImage", images=sampler[2], filename_prefix="layout")
    return graph, sampler


def run(comfy, graph, sampler) -> dict:
    entry = comfy.run(graph.prompt())
    saved = images(comfy, entry)
    return {"latent": latents(comfy, entry)["latent"], "masks": [m[..., 0] / 255.0 for m in saved["masks"]],
            "layout": saved["layout"][0], "text": entry["outputs"].get(sampler.id, {}).get("text", [""])[0]}


def test_two_named_concepts_get_disjoint_masks_as_outputs_the_same_on_a_second_run_and_new_for_a_new_seed(
        comfy, libraries):
    first = run(comfy, *sampler_graph(libraries["distinct"]))
    other_seed = run(comfy, *sampler_graph(libraries["distinct"], seed=SAMPLING["seed"] + 1))
    again = run(comfy, *sampler_graph(libraries["distinct"]))
    plain = run(comfy, *sampler_graph(libraries["distinct"], auto_regions=False))

    dog, duck = first["masks"]
    assert dog.shape == duck.shape == (128, 256)
    assert set(np.unique(dog)) <= {0.0, 1.0} and set(np.unique(duck)) <= {0.0, 1.0}
    assert dog.sum() > 0 and duck.sum() > 0, "a concept got an empty region"
    assert not (dog * duck).any(), "the two regions overlap"
    assert first["text"] == "", first["text"]
    assert first["layout"].shape[:2] == (256, 512)

    for mask, repeated in zip(first["masks"], again["masks"]):
        np.testing.assert_array_equal(mask, repeated)
    np.testing.assert_array_equal(first["latent"], again["latent"])
    assert any((a != b).any() for a, b in zip(first["masks"], other_seed["masks"])), "a new seed kept the masks"
    assert np.abs(first["latent"] - plain["latent"]).mean() > 1e-3, "the automatic regions had no effect"
    assert len(plain["masks"]) == 1 and not plain["masks"][0].any()


def test_a_drawn_region_replaces_its_concepts_automatic_one_and_the_other_stays_automatic(comfy, libraries):
    def dog_on_the_left(graph, encode):
        return graph.add("CIDM_RegionCondition", conditioning=encode("a photo of a <dog>"), x=0.0, y=0.0, width=0.5,
                         height=1.0, strength=1.0)[0]

    found = run(comfy, *sampler_graph(libraries["distinct"], regions=dog_on_the_left))
    assert len(found["masks"]) == 1, "the drawn concept still got an automatic mask"
    assert found["masks"][0].sum() > 0
    layout = found["layout"]
    assert (layout[128, 64] != 245).any(), "the drawn region is not in the layout"


def test_concepts_the_probe_cannot_tell_apart_fall_back_to_named_routing_and_say_so(comfy, libraries):
    found = run(comfy, *sampler_graph(libraries["twins"]))
    plain = run(comfy, *sampler_graph(libraries["twins"], auto_regions=False))
    assert "attend to the same places" in found["text"] and "without them" in found["text"], found["text"]
    assert len(found["masks"]) == 2 and not any(mask.any() for mask in found["masks"])
    np.testing.assert_allclose(found["latent"], plain["latent"], atol=1e-4 * np.abs(plain["latent"]).max())


def test_a_latent_not_a_multiple_of_64_pixels(comfy, libraries):
    found = run(comfy, *sampler_graph(libraries["distinct"], width=200, height=136))
    assert found["latent"].shape == (1, 4, 17, 25)
    assert [mask.shape for mask in found["masks"]] == [(136, 200)] * 2
    assert all(mask.sum() > 0 for mask in found["masks"]), found["text"]


def test_a_batch_of_two_latents_gets_each_its_own_regions(comfy, libraries):
    found = run(comfy, *sampler_graph(libraries["distinct"], batch_size=2))
    assert found["latent"].shape[0] == 2
    assert len(found["masks"]) == 4 and all(mask.sum() > 0 for mask in found["masks"]), found["text"]
    for first, second in (found["masks"][:2], found["masks"][2:]):
        assert not (first * second).any()


def test_the_guider_finds_the_same_regions_as_the_ksampler_and_serves_a_second_run(comfy, libraries):
    """The Guider equals the KSampler; the same GUIDER then samples another seed as a fresh KSampler does (no
    automatic region of the first run stays in it)."""
    graph, sampler = sampler_graph(libraries["distinct"])
    inputs = graph.prompt()[sampler.id]["inputs"]
    guider = graph.add("CIDM_ContextControlledGuider", **{name: inputs[name] for name in (
        "model", "positive", "negative", "cfg", "alpha", "auto_regions", "probe_steps")})
    sigmas = graph.add("BasicScheduler", model=inputs["model"], scheduler=SAMPLING["scheduler"],
                       steps=SAMPLING["steps"], denoise=1.0)
    sampled = graph.add("SamplerCustomAdvanced", noise=graph.add("RandomNoise", noise_seed=SAMPLING["seed"])[0],
                        guider=guider[0], sampler=graph.add("KSamplerSelect", sampler_name=SAMPLING["sampler_name"])[0],
                        sigmas=sigmas[0], latent_image=inputs["latent_image"])
    graph.add("SaveLatent", samples=sampled[0], filename_prefix="guided")
    again = graph.add("SamplerCustomAdvanced", noise=graph.add("RandomNoise", noise_seed=SAMPLING["seed"] + 1)[0],
                      guider=guider[0], sampler=graph.add("KSamplerSelect", sampler_name=SAMPLING["sampler_name"])[0],
                      sigmas=sigmas[0], latent_image=inputs["latent_image"])
    graph.add("SaveLatent", samples=again[0], filename_prefix="guided_again")
    other = graph.add("CIDM_ContextControlledKSampler", **{**inputs, "seed": SAMPLING["seed"] + 1})
    graph.add("SaveLatent", samples=other[0], filename_prefix="other_seed")
    found = latents(comfy, comfy.run(graph.prompt()))
    np.testing.assert_array_equal(found["guided"], found["latent"])
    np.testing.assert_array_equal(found["guided_again"], found["other_seed"])
