"""CIDM Text Encode, Elastic Aggregate LoRAs and Inspect Aggregation Weights in the real server."""

import numpy as np
import pytest

from comfy_host import Graph, sample_image, stage
from pack_workflows import CKPT, pixels, train_graph
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

LIBRARY = "aggregate"
AGGREGATE = dict(tasks="all", scale=0.8, mode="elastic", weights="", uncond_weights="match cond")


@pytest.fixture(scope="module")
def library(comfy):
    """dog then duck, trained for a few steps each (large learning rates so the LoRAs visibly act)."""
    comfy.run(train_graph(LIBRARY, "dog", stage(comfy.workspace, "dog"), steps=4, embedding_lr=2e-2).prompt())
    comfy.run(train_graph(LIBRARY, "duck", stage(comfy.workspace, "duck_toy"), steps=4, embedding_lr=2e-2,
                          class_words="duck", training_seed=1).prompt())
    return LIBRARY


def aggregated_sample(graph, checkpoint, model, library_name, text, prefix, seed=1):
    lib = graph.add("CIDM_LoadConceptLibrary", library=library_name)
    patched = graph.add("CIDM_ElasticAggregateLoRAs", model=model, library=lib[0], **AGGREGATE)
    positive = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text=text)
    # A plain 77-token negative: ComfyUI repeats it to the packed length when batching it with the positive.
    return sample_image(graph, patched[0], checkpoint[1], checkpoint[2], prefix=prefix, seed=seed,
                        positive_cond=positive[0])


def test_aggregate_text_encode_and_stock_ksampler_write_an_image(comfy, library):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    aggregated_sample(graph, checkpoint, checkpoint[0], library, "a <dog> and a <duck> on a beach", "agg")
    image = pixels(comfy, comfy.run(graph.prompt()))
    assert image.shape == (64, 64, 3)


def mean_weights(comfy, library_name: str, text: str) -> dict[str, float]:
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library_name)
    inspect = graph.add("CIDM_InspectAggregationWeights", clip=checkpoint[1], library=lib[0], text=text,
                        mode="elastic")
    entry = comfy.run(graph.prompt())
    (table,) = entry["outputs"][inspect.id]["text"]
    assert entry["outputs"][inspect.id]["images"], "the weight plot is previewed"
    header = next(line for line in table.splitlines() if line.startswith("layer |"))
    mean = next(line for line in table.splitlines() if line.strip().startswith("mean |"))
    names = [name.strip().split(":", 1)[1] for name in header.split("|")[1:]]
    return dict(zip(names, (float(v) for v in mean.split("|")[1:])))


def test_changing_the_prompt_moves_the_weights(comfy, library):
    dog = mean_weights(comfy, library, "a photo of a <dog>")
    duck = mean_weights(comfy, library, "a photo of a <duck>")
    assert sum(dog.values()) == pytest.approx(1.0, abs=2e-3)
    assert dog["dog"] > duck["dog"] and duck["duck"] > dog["duck"], (dog, duck)


def test_unknown_concept_lists_the_known_ones(comfy, library):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    graph.add("CIDM_InspectAggregationWeights", clip=checkpoint[1], library=lib[0], text="a <cat>", mode="elastic")
    error = comfy.run_expecting_error(graph.prompt())
    assert "<cat>" in error and "<dog>" in error and "<duck>" in error


def test_text_encode_without_the_patch_still_samples(comfy, library):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    positive = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text="a photo of a <dog>")
    sample_image(graph, checkpoint[0], checkpoint[1], checkpoint[2], positive_cond=positive[0], prefix="unpatched")
    image = pixels(comfy, comfy.run(graph.prompt()))
    assert np.isfinite(image).all() and image.std() > 0


def stock_lora(comfy, library_name: str) -> str:
    graph = Graph()
    lib = graph.add("CIDM_LoadConceptLibrary", library=library_name)
    graph.add("CIDM_ExportConceptLoRA", library=lib[0], concept="duck", filename=f"{library_name}_stock")
    comfy.run(graph.prompt())
    return f"{library_name}_stock.safetensors"


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-aggregate", "aggregate-then-lora"])
def test_stock_lora_still_applies_and_model_switching_works(comfy, library, lora_first):
    lora_name = stock_lora(comfy, library)

    def run(with_lora: bool, prefix: str):
        graph = Graph()
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        lib = graph.add("CIDM_LoadConceptLibrary", library=library)
        model = checkpoint[0]
        if with_lora and lora_first:
            model = graph.add("LoraLoader", model=model, clip=checkpoint[1], lora_name=lora_name,
                              strength_model=4.0, strength_clip=0.0)[0]
        model = graph.add("CIDM_ElasticAggregateLoRAs", model=model, library=lib[0], **AGGREGATE)[0]
        if with_lora and not lora_first:
            model = graph.add("LoraLoaderModelOnly", model=model, lora_name=lora_name, strength_model=4.0)[0]
        positive = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text="a photo of a <dog>")
        sample_image(graph, model, checkpoint[1], checkpoint[2], positive_cond=positive[0], prefix=prefix)
        return pixels(comfy, comfy.run(graph.prompt()))

    def stock(prefix: str):
        graph = Graph()
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        sample_image(graph, checkpoint[0], checkpoint[1], checkpoint[2], "a photo of a dog", prefix=prefix, seed=7)
        return pixels(comfy, comfy.run(graph.prompt()))

    before = stock(f"stock_before_{lora_first}")
    without = run(False, f"agg_only_{lora_first}")
    with_lora = run(True, f"agg_lora_{lora_first}")
    assert np.abs(with_lora - without).mean() > 0.5, "the stock LoRA was dropped by the aggregate patch"
    after = stock(f"stock_after_{lora_first}")
    assert np.array_equal(before, after), "the patched model left residue on the base model"
    assert "lora key not loaded" not in comfy.log()


def test_sixteen_layer_checkpoint(comfy):
    ckpt = "cidm_sd15_blocks.safetensors"
    synthesize_library(comfy.workspace / "models" / "checkpoints" / ckpt,
                       comfy.workspace / "models" / "cidm" / "sixteen", ["dog", "cat"])
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    aggregated_sample(graph, checkpoint, checkpoint[0], "sixteen", "a photo of a <cat>", "sixteen")
    assert pixels(comfy, comfy.run(graph.prompt())).shape == (64, 64, 3)


def test_area_and_masked_conds_carry_the_layer_contexts(comfy, library):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    patched = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], **AGGREGATE)
    dog = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text="a photo of a <dog>")
    duck = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text="a photo of a <duck>")
    left = graph.add("ConditioningSetAreaPercentage", conditioning=dog[0], width=0.5, height=1.0, x=0.0, y=0.0,
                     strength=1.0)
    mask = graph.add("SolidMask", value=1.0, width=64, height=64)
    right = graph.add("ConditioningSetMask", conditioning=duck[0], mask=mask[0], strength=1.0,
                      set_cond_area="default")
    combined = graph.add("ConditioningCombine", conditioning_1=left[0], conditioning_2=right[0])
    sample_image(graph, patched[0], checkpoint[1], checkpoint[2], positive_cond=combined[0], prefix="areas")
    image = pixels(comfy, comfy.run(graph.prompt()))
    assert image.shape == (64, 64, 3) and image.std() > 0
