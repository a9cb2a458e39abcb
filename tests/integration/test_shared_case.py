"""One shared tiny case on both paths: the toy world's first two concepts (a same-shape pair), with the same training
images, captions and settings, learned in sequence by Train Concept Increment in the real server and by the
toy-world protocol. Each path records task 2's consolidation penalty; both must be what cidm's consolidator computes
from the factors they stored, and both must have trained through the same cidm trainer."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.toyworld import concepts, models, protocol, run
from cidm.consolidation import CONSOLIDATORS, ConsolidationWeights, make_consolidator
from cidm.library import ConceptLibrary
from cidm.train import ConceptTrainer
from pack_workflows import library_root, train_graph

pytestmark = pytest.mark.integration

LIBRARY_NAME = "shared_case"
METHOD = "cidm-official"  # its penalty keeps no state, so it can be recomputed from the stored factors alone
SHARED = dict(method=METHOD, steps=2, rank=4, lora_lr=1e-2, embedding_lr=1e-3, batch_size=2)
CONCEPTS = concepts.make_world(0).concepts[:2]
NODE_RESOLUTION = 64  # the node's smallest: the 32×32 renders are enlarged, pixel for pixel


def stage_toy_concept(workspace, concept: concepts.Concept) -> str:
    """The concept's toy-world training images and captions, as a folder the node reads."""
    folder = workspace / "input" / "toyworld" / concept.name
    folder.mkdir(parents=True, exist_ok=True)
    training = protocol.training_set(concept, run.FULL[2], world_seed=0)
    for image, caption, source in zip(training.images, training.captions, training.sources):
        pixels = (image.numpy() * 255).round().astype(np.uint8)
        resized = Image.fromarray(pixels).resize((NODE_RESOLUTION, NODE_RESOLUTION), Image.Resampling.NEAREST)
        resized.save(folder / f"{source}.png")
        (folder / f"{source}.txt").write_text(caption, encoding="utf-8")
    return f"toyworld/{concept.name}"


def recomputed(old_lora, new_lora) -> float:
    with torch.no_grad():
        return float(make_consolidator(METHOD, [old_lora], ConsolidationWeights()).loss(new_lora, 0))


def test_node_and_toy_world_run_the_same_cidm_code_on_a_shared_case(comfy, tmp_path):
    for seed, concept in enumerate(CONCEPTS):
        comfy.run(train_graph(LIBRARY_NAME, concept.name, stage_toy_concept(comfy.workspace, concept),
                              training_seed=seed, **SHARED).prompt())
    library = ConceptLibrary.open(library_root(comfy, LIBRARY_NAME))
    records = [library.task(i) for i in (1, 2)]
    assert [r.concept for r in records] == [c.name for c in CONCEPTS] and {r.method for r in records} == {METHOD}
    node_first, node_second = library.load_all()
    node_penalties = [r.hyperparameters["consolidation_penalty"] for r in records]

    base_config, _, protocol_config = run.SMOKE
    setup = protocol.Setup(models.load_or_train_base(base_config, tmp_path, log=lambda _: None), None,
                           concepts.make_world(0))
    config = dataclasses.replace(protocol_config, training=dataclasses.replace(protocol_config.training, **SHARED))
    first_trainer, first = protocol.learn(setup, 0, [], METHOD, config)
    second_trainer, second = protocol.learn(setup, 1, [first], METHOD, config)
    toy_penalties = [first.task.consolidation_penalty, second.task.consolidation_penalty]

    assert records[1].hyperparameters["images"] == len(protocol.training_set(CONCEPTS[1], config, 0).images)
    assert all(type(t) is ConceptTrainer for t in (first_trainer, second_trainer))
    assert type(second_trainer.consolidator) is CONSOLIDATORS[METHOD]
    # Task 1 has nothing to consolidate against; task 2's penalty is cidm's, from the factors each path kept
    # (the library stores them in fp16).
    assert node_penalties[0] == toy_penalties[0] == 0.0
    assert node_penalties[1] > 0 and toy_penalties[1] > 0
    assert node_penalties[1] == pytest.approx(recomputed(node_first.lora, node_second.lora), rel=1e-2)
    assert toy_penalties[1] == pytest.approx(recomputed(first.task.lora, second.task.lora), rel=1e-6)
