"""What a MODEL already carries, in the real server (issue 29, kind 3): Load Concept as LoRA checks the base model
as Elastic Aggregate LoRAs does, Train Concept Increment refuses a model with LoRAs or concepts applied, and no
library task is applied twice on one model chain."""

import pytest
from safetensors.torch import load_file, save_file

from cidm.export import standard_lora_state_dict
from comfy_host import Graph, draw_concept
from pack_workflows import CKPT, add_trainer, library_root, snapshot
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

OTHER_CKPT = "cidm_sd15_blocks.safetensors"
LIBRARY = "chained"
AGGREGATE = dict(scale=0.8, mode="named", weights="", uncond_weights="match cond")


@pytest.fixture(scope="module")
def library(comfy):
    """dog and duck on the mini checkpoint, and the dog as a stock LoRA file in models/loras."""
    lib = synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, library_root(comfy, LIBRARY),
                             ["dog", "duck"])
    loras = comfy.workspace / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file(standard_lora_state_dict(lib.load_task(1).lora, lib.base_model["layer_paths"], 1.0),
              str(loras / "chained_dog.safetensors"))
    return LIBRARY


def chain(graph: Graph, model, lib, steps: list[tuple]):
    """`model` through the nodes `steps` names: ("aggregate", tasks), ("concept", name) or ("lora", file)."""
    for kind, value in steps:
        if kind == "aggregate":
            model = graph.add("CIDM_ElasticAggregateLoRAs", model=model, library=lib, tasks=value, **AGGREGATE)[0]
        elif kind == "concept":
            model = graph.add("CIDM_LoadConceptAsLoRA", model=model, library=lib, concept=value,
                              strength_model=1.0)[0]
        else:
            model = graph.add("LoraLoaderModelOnly", model=model, lora_name=value, strength_model=1.0)[0]
    return model


def sampled(graph: Graph, checkpoint, model, prefix: str) -> None:
    positive = graph.add("CLIPTextEncode", text="a photo of a dog", clip=checkpoint[1])[0]
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    samples = graph.add("KSampler", model=model, seed=1, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                        positive=positive, negative=positive, latent_image=latent[0], denoise=1.0)
    graph.add("SaveLatent", samples=samples[0], filename_prefix=prefix)


@pytest.mark.parametrize("node", ["concept", "aggregate"])
def test_another_base_model_is_refused_by_both_appliers(comfy, library, node):
    """Load Concept as LoRA on another checkpoint used to log "lora key not loaded" and sample the plain model."""
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=OTHER_CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    sampled(graph, checkpoint, chain(graph, checkpoint[0], lib[0], [(node, "dog" if node == "concept" else "all")]),
            f"other_base_{node}")
    error = comfy.run_expecting_error(graph.prompt())
    assert f"model: library {library} was trained on base model" in error, error
    assert "lora key not loaded" not in comfy.log()


@pytest.mark.parametrize("steps, refused", [
    ([("aggregate", "all"), ("aggregate", "all")], "library: 'dog' (task 1 of library 'chained', applied by "
                                                   "Elastic Aggregate LoRAs), 'duck'"),
    ([("aggregate", "dog, duck"), ("aggregate", "duck")], "library: 'duck' (task 2"),
    ([("aggregate", "all"), ("concept", "dog")], "concept: 'dog' (task 1 of library 'chained', applied by "
                                                 "Elastic Aggregate LoRAs)"),
    ([("concept", "dog"), ("aggregate", "all")], "library: 'dog' (task 1 of library 'chained', applied by "
                                                 "Load Concept as LoRA)"),
    ([("concept", "duck"), ("concept", "duck")], "concept: 'duck' (task 2"),
], ids=["aggregate-twice", "overlapping-tasks", "aggregate-then-concept", "concept-then-aggregate", "concept-twice"])
def test_a_task_is_never_applied_twice_on_one_chain(comfy, library, steps, refused):
    """Two Elastic Aggregate LoRAs on one library used to apply its LoRAs twice (outputs 69–78 apart)."""
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    sampled(graph, checkpoint, chain(graph, checkpoint[0], lib[0], steps), "twice")
    error = comfy.run_expecting_error(graph.prompt())
    assert refused in error and "already on this model" in error, error


def test_each_task_once_still_chains(comfy, library):
    """Disjoint tasks of one library, and a task as a plain LoRA next to the library's other tasks, are fine."""
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    for number, steps in enumerate(([("aggregate", "dog"), ("aggregate", "duck")],
                                    [("concept", "dog"), ("aggregate", "duck")])):
        sampled(graph, checkpoint, chain(graph, checkpoint[0], lib[0], steps), f"once_{number}")
    comfy.run(graph.prompt())


def dot_folder(comfy) -> str:
    folder = comfy.workspace / "input" / "chain-dot"
    if not folder.exists():
        folder.mkdir(parents=True)
        draw_concept(folder, "dot", count=1)
    return folder.name


@pytest.mark.parametrize("steps", [
    [("lora", "chained_dog.safetensors")], [("concept", "dog")], [("aggregate", "all")],
], ids=["stock-lora", "load-concept-as-lora", "elastic-aggregate"])
def test_training_refuses_a_model_that_carries_loras_or_concepts(comfy, library, steps):
    """A stock LoRA on the training model used to be learned into the task, which is applied on the base model."""
    before = snapshot(library_root(comfy, library))
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    model = chain(graph, checkpoint[0], lib[0], steps)
    add_trainer(graph, (model, checkpoint[1], checkpoint[2]), lib[0], "dot", dot_folder(comfy), steps=1)
    error = comfy.run_expecting_error(graph.prompt())
    assert "model: this model carries" in error and "Train on the model straight from the checkpoint" in error, error
    assert ("weight patches" in error) == (steps[0][0] != "aggregate"), error
    assert ("CIDM concepts" in error) == (steps[0][0] != "lora"), error
    assert snapshot(library_root(comfy, library)) == before


def test_training_honours_the_models_parameterisation(comfy):
    """ModelSamplingDiscrete on the training model changes no weight, so training accepts it, and learns what that
    model predicts: a v-prediction model trains on v (it used to be trained as eps)."""
    for name, sampling in (("param-eps", None), ("param-v", "v_prediction")):
        graph = Graph()
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        model = checkpoint[0]
        if sampling:
            model = graph.add("ModelSamplingDiscrete", model=model, sampling=sampling, zsnr=False)[0]
        lib = graph.add("CIDM_LoadConceptLibrary", library=name)
        add_trainer(graph, (model, checkpoint[1], checkpoint[2]), lib[0], "dot", dot_folder(comfy), steps=1)
        comfy.run(graph.prompt())
    eps, v = (load_file(next(library_root(comfy, name).glob("task_001*.safetensors")))
              for name in ("param-eps", "param-v"))
    assert eps.keys() == v.keys()
    assert any(not eps[key].equal(v[key]) for key in eps), "trained as eps on a v-prediction model"
