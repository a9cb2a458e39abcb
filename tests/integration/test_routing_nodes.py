"""Routing on the real server with the 16-layer checkpoint: named concepts, the per-cond transport through ComfyUI's
batching, coexistence with other patches and samplers, and errors that name the real cause."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from comfy_host import Graph, ensure_checkpoint, with_hook_lora
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

CKPT16 = "cidm_sd15_blocks.safetensors"
MINI = "cidm_mini_sd15.safetensors"
NEGATIVES = {77: "blurry, low quality", 154: "blurry " * 100, 308: "blurry " * 250, 616: "blurry " * 560}
SAMPLER = dict(steps=2, cfg=5.0, sampler_name="euler", scheduler="normal")


@pytest.fixture(scope="module")
def libraries(comfy):
    checkpoints = comfy.workspace / "models" / "checkpoints"
    root = comfy.workspace / "models" / "cidm"
    for name, checkpoint, concepts, seed, multiplier in (
            ("routing", CKPT16, ["dog", "cat"], 0, 1.0), ("routing-x2", CKPT16, ["dog", "cat"], 0, 2.0),
            ("routing-b", CKPT16, ["duck"], 5, 1.0), ("routing-mini", MINI, ["dog"], 0, 1.0)):
        if not (root / name).exists():
            synthesize_library(checkpoints / checkpoint, root / name, concepts, seed=seed, lora_std=0.2,
                               multiplier=multiplier)
    return "routing"


def aggregate(graph, model, library="routing", **overrides):
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    inputs = dict(tasks="all", scale=1.0, mode="named", weights="", uncond_weights="match cond")
    return graph.add("CIDM_ElasticAggregateLoRAs", model=model, library=lib[0], **{**inputs, **overrides})[0]


def encode(graph, clip, text, library="routing"):
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    return graph.add("CIDM_TextEncode", clip=clip, library=lib[0], text=text)[0]


def sample(comfy, tag, text="a photo of a <dog>", negative=77, patch=None, sampler="KSampler", count=False,
           positive_patch=None, steps=SAMPLER["steps"], library="routing"):
    """The latent of one sampling run on the 16-layer checkpoint: `patch(graph, model, clip)` returns the model,
    `positive_patch(graph, positive)` the positive conditioning."""
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT16)
    model = patch(graph, checkpoint[0], checkpoint[1]) if patch else checkpoint[0]
    if count:
        model = graph.add("CIDMTest_CountUNetCalls", model=model, tag=tag)[0]
    positive = encode(graph, checkpoint[1], text, library)
    if positive_patch:
        positive = positive_patch(graph, positive)
    negative_cond = graph.add("CLIPTextEncode", clip=checkpoint[1], text=NEGATIVES[negative])[0]
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    if sampler == "KSampler":
        sampled = graph.add("KSampler", model=model, seed=3, positive=positive, negative=negative_cond,
                            latent_image=latent, denoise=1.0, **{**SAMPLER, "steps": steps})[0]
    elif sampler == "KSamplerAdvanced":
        sampled = graph.add("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=3, positive=positive,
                            negative=negative_cond, latent_image=latent, start_at_step=0, end_at_step=10000,
                            return_with_leftover_noise="disable", **SAMPLER)[0]
    else:
        noise = graph.add("RandomNoise", noise_seed=3)[0]
        guider = graph.add("CFGGuider", model=model, positive=positive, negative=negative_cond, cfg=SAMPLER["cfg"])[0]
        chosen = graph.add("KSamplerSelect", sampler_name=SAMPLER["sampler_name"])[0]
        sigmas = graph.add("BasicScheduler", model=model, scheduler=SAMPLER["scheduler"], steps=SAMPLER["steps"],
                           denoise=1.0)[0]
        sampled = graph.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=chosen, sigmas=sigmas,
                            latent_image=latent)[0]
    graph.add("CIDMTest_SaveLatent", samples=sampled, tag=tag)
    comfy.run(graph.prompt())
    return load_file(str(comfy.workspace / "output" / f"{tag}.safetensors"))["samples"]


def named(**overrides):
    return lambda graph, model, clip: aggregate(graph, model, **overrides)


def unet_calls(comfy, tag):
    return re.findall(rf"CIDM-TEST-UNET {tag} batch=(\d+) cond_or_uncond=\[([\d, ]+)\] tokens=(\d+)", comfy.log())


@pytest.mark.parametrize("negative", [77, 154, 308])
def test_cidm_positive_and_stock_negative_run_as_one_batched_unet_call_per_step(comfy, libraries, negative):
    sample(comfy, f"batched{negative}", negative=negative, patch=named(), count=True)
    calls = unet_calls(comfy, f"batched{negative}")
    assert len(calls) == SAMPLER["steps"], calls
    assert all(batch == "2" and sorted(kinds.split(", ")) == ["0", "1"] for batch, kinds, _ in calls), calls
    assert {int(tokens) for _, _, tokens in calls} == {negative}  # the whole negative reaches the model


def test_a_prompt_naming_no_concept_is_the_base_model_bit_for_bit(comfy, libraries):
    for negative in (77, 308):
        text = "a photo of a dog on a beach"
        base = sample(comfy, f"base{negative}", text=text, negative=negative)
        patched = sample(comfy, f"noconcept{negative}", text=text, negative=negative, patch=named())
        assert np.array_equal(base, patched), negative


def copy_library(comfy, source: str, name: str, version: int, **base_model) -> str:
    """Library `name`: `source`'s folder with its manifest rewritten as `version`, `base_model` fields replaced
    (None: removed)."""
    root = comfy.workspace / "models" / "cidm"
    if not (root / name).exists():
        shutil.copytree(root / source, root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        fields = {**manifest["base_model"], **base_model}
        manifest.update(version=version, name=name,
                        base_model={key: value for key, value in fields.items() if value is not None})
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    return name


def test_a_version_1_library_samples_bit_for_bit_as_with_its_per_layer_map(comfy, libraries):
    """A library as the pack wrote it before token-slot maps (manifest version 1, no map) reads as one slot per
    layer: it samples exactly as the same tasks recorded with that map explicitly (version 2)."""
    old = copy_library(comfy, "routing", "routing-v1", 1, token_slots=None)
    mapped = copy_library(comfy, "routing", "routing-v2", 2, token_slots=list(range(16)))
    before = sample(comfy, "version1", library=old, patch=named(library=old))
    after = sample(comfy, "version2", library=mapped, patch=named(library=mapped))
    assert np.array_equal(before, after)
    assert not np.array_equal(before, sample(comfy, "version-base"))


def test_an_unnamed_task_is_not_applied_and_named_ones_are(comfy, libraries):
    base = sample(comfy, "dog_base")
    dog_all = sample(comfy, "dog_all", patch=named())
    dog_only = sample(comfy, "dog_only", patch=named(tasks="dog"))
    assert np.abs(dog_all - base).mean() > 1e-3, "the named concept's LoRA did not act"
    assert np.array_equal(dog_all, dog_only), "the unnamed task <cat> changed the output"


def test_the_aggregate_applies_the_stored_task_multiplier(comfy, libraries):
    once = sample(comfy, "multiplier_1", patch=named(scale=1.0))
    twice_at_half = sample(comfy, "multiplier_2_half", patch=named(library="routing-x2", scale=0.5))
    twice = sample(comfy, "multiplier_2", patch=named(library="routing-x2", scale=1.0))
    assert np.array_equal(once, twice_at_half), "multiplier 2 at scale 0.5 must equal multiplier 1 at scale 1"
    assert np.abs(twice - once).mean() > 1e-3


def test_two_named_concepts_both_apply(comfy, libraries):
    text = "a <dog> and a <cat> in a garden"
    both = sample(comfy, "pair_both", text=text, patch=named())
    for single in ("dog", "cat"):
        alone = sample(comfy, f"pair_{single}", text=text, patch=named(tasks=single))
        assert np.abs(both - alone).mean() > 1e-3, f"only {single} applied"


@pytest.mark.parametrize("negative", [77, 616])
def test_the_stock_negative_gets_its_positives_weights_however_it_is_batched(comfy, libraries, negative):
    matched = sample(comfy, f"match{negative}", negative=negative, patch=named(), count=True)
    own = sample(comfy, f"own{negative}", negative=negative, patch=named(uncond_weights="own"))
    assert np.abs(matched - own).mean() > 1e-3, "the negative was routed from itself under 'match cond'"
    batches = {batch for batch, _, _ in unet_calls(comfy, f"match{negative}")}
    assert batches == ({"2"} if negative == 77 else {"1"})  # 616 tokens: ComfyUI runs cond and uncond apart


def test_elastic_one_hot_and_fixed_modes_still_sample(comfy, libraries):
    base = sample(comfy, "modes_base")
    for mode, weights in (("elastic", ""), ("one-hot", ""), ("fixed", "0.5, 1"), ("named-elastic", "")):
        latent = sample(comfy, f"mode_{mode}", patch=named(mode=mode, weights=weights))
        assert np.isfinite(latent).all() and np.abs(latent - base).mean() > 1e-3, mode


def test_two_chained_aggregates_both_apply(comfy, libraries):
    def first(graph, model, clip):
        return aggregate(graph, model)

    def second(graph, model, clip):
        return aggregate(graph, model, library="routing-b", mode="fixed", weights="1")

    def chained(graph, model, clip):
        return second(graph, first(graph, model, clip), clip)

    only_first, only_second = sample(comfy, "chain_a", patch=first), sample(comfy, "chain_b", patch=second)
    both = sample(comfy, "chain_ab", patch=chained)
    assert np.abs(both - only_first).mean() > 1e-3 and np.abs(both - only_second).mean() > 1e-3


def test_an_attn2_replace_patch_does_not_skip_the_concept_loras(comfy, libraries):
    def replaced(graph, model, clip):
        return graph.add("CIDMTest_Attn2Replace", model=model)[0]

    base_replaced = sample(comfy, "replace_base", patch=replaced)
    for order in ("after", "before"):
        def patch(graph, model, clip, order=order):
            if order == "after":
                return replaced(graph, aggregate(graph, model), clip)
            return aggregate(graph, replaced(graph, model, clip))

        ours = sample(comfy, f"replace_{order}", patch=patch)
        plain = sample(comfy, "replace_none", patch=named())
        assert np.abs(ours - base_replaced).mean() > 1e-3, f"CIDM's LoRAs were skipped ({order})"
        assert np.allclose(ours, plain, atol=1e-3), order


def test_a_weight_hook_keyframed_on_mid_run_reaches_the_concept_loras_projections(comfy, libraries):
    """ComfyUI weight hooks re-patch the weights in place between steps; a LoRA folded into a projection's weight
    once per run would keep the first step's weights (nodes/host/model.py:weights_fixed_for_run)."""
    graph = Graph()
    lib = graph.add("CIDM_LoadConceptLibrary", library="routing-b")
    graph.add("CIDM_ExportConceptLoRA", library=lib[0], concept="duck", filename="routing_hook_duck")
    comfy.run(graph.prompt())

    def hooked(keyframed: bool):
        return lambda graph, positive: with_hook_lora(graph, positive, "routing_hook_duck.safetensors", keyframed)

    plain = sample(comfy, "hook_none", patch=named(), steps=4)
    always = sample(comfy, "hook_always", patch=named(), positive_patch=hooked(False), steps=4)
    on_later = sample(comfy, "hook_on_later", patch=named(), positive_patch=hooked(True), steps=4)
    assert np.abs(always - plain).mean() > 1e-3, "the hook LoRA did not act"
    assert np.abs(on_later - plain).mean() > 1e-3, "the hook's keyframe did not reach the projections"


@pytest.mark.parametrize("sampler", ["KSamplerAdvanced", "SamplerCustomAdvanced"])
def test_every_stock_sampler_samples_with_the_patch(comfy, libraries, sampler):
    reference = sample(comfy, "sampler_ksampler", patch=named())
    patched = sample(comfy, f"sampler_{sampler}", patch=named(), sampler=sampler)
    base = sample(comfy, f"sampler_{sampler}_base", sampler=sampler)
    assert np.abs(patched - base).mean() > 1e-3
    assert np.array_equal(patched, reference), "the same sampling through another node differs"


def run_error(comfy, build) -> str:
    graph = Graph()
    build(graph)
    return comfy.run_expecting_error(graph.prompt())


def test_aggregate_reports_the_models_own_layer_count(comfy, libraries):
    def build(graph):
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT16)
        graph.add("CIDMTest_SaveLatent", tag="never", samples=graph.add(
            "KSampler", model=aggregate(graph, checkpoint[0], library="routing-mini", mode="elastic"), seed=0,
            positive=encode(graph, checkpoint[1], "a photo", library="routing"),
            negative=encode(graph, checkpoint[1], "", library="routing"),
            latent_image=graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)[0], denoise=1.0,
            **SAMPLER)[0])
    error = run_error(comfy, build)
    assert "(4 layers)" in error and "this model is" in error and "(16 layers)" in error, error


def test_aggregate_on_an_sd2_model_names_the_real_cause(comfy, libraries):
    unet_dir = comfy.workspace / "models" / "diffusion_models"
    unet_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ensure_checkpoint("mini-sd2"), unet_dir / "cidm_mini_sd2_routing.safetensors")

    def build(graph):
        unet = graph.add("UNETLoader", unet_name="cidm_mini_sd2_routing.safetensors", weight_dtype="default")
        clip = graph.add("CheckpointLoaderSimple", ckpt_name=MINI)[1]
        conditioning = encode(graph, clip, "a photo of a <dog>", library="routing-mini")
        graph.add("CIDMTest_SaveLatent", tag="never", samples=graph.add(
            "KSampler", model=aggregate(graph, unet[0], library="routing-mini", mode="elastic"), seed=0,
            positive=conditioning,
            negative=conditioning, latent_image=graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)[0],
            denoise=1.0, **SAMPLER)[0])
    error = run_error(comfy, build)
    assert "model:" in error and "1024" in error and "SD1.5" in error, error


def test_text_encode_refuses_a_clip_of_another_base_model(comfy, libraries):
    def build(graph):
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT16)
        conditioning = encode(graph, checkpoint[1], "a photo of a <dog>", library="routing-mini")
        graph.add("CIDMTest_SaveLatent", tag="never", samples=graph.add(
            "KSampler", model=checkpoint[0], seed=0, positive=conditioning, negative=conditioning,
            latent_image=graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)[0], denoise=1.0,
            **SAMPLER)[0])
    error = run_error(comfy, build)
    assert "clip:" in error and "text encoder" in error, error


def inspect_table(comfy, text, mode, tasks="all"):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT16)
    lib = graph.add("CIDM_LoadConceptLibrary", library="routing")
    node = graph.add("CIDM_InspectAggregationWeights", clip=checkpoint[1], library=lib[0], text=text, mode=mode,
                     tasks=tasks, weights="")
    (table,) = comfy.run(graph.prompt())["outputs"][node.id]["text"]
    lines = table.splitlines()
    names = [name.strip() for name in next(line for line in lines if line.startswith("layer |")).split("|")[1:]]
    mean = next(line for line in lines if line.strip().startswith("mean |"))
    return dict(zip(names, (float(v) for v in mean.split("|")[1:])))


def test_inspect_shows_the_chosen_modes_weights_for_the_selected_tasks(comfy, libraries):
    assert inspect_table(comfy, "a photo of a <cat>", "elastic", tasks="dog") == {"1:dog": 1.0}
    assert inspect_table(comfy, "a photo of a <dog>", "named") == {"1:dog": 1.0, "2:cat": 0.0}
