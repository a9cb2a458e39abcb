"""Train Concept Increment as a user meets it in the real server: the inputs on its face, the hyperparameters from
Concept Training Options, a training seed the frontend leaves alone, and image lists from ComfyUI's dataset nodes."""

import json

import pytest
from safetensors.torch import load_file

from comfy_host import Graph, draw_concept, stage
from pack_workflows import CKPT, TRAIN_OPTIONS, add_trainer, library_root, snapshot

pytestmark = pytest.mark.integration

ON_THE_NODE = ["model", "clip", "vae", "library", "concept", "method", "steps"]
OPTIONAL = ["images", "folder", "options"]


def test_train_node_shows_only_what_a_user_chooses(comfy):
    node = comfy.object_info("CIDM_TrainConceptIncrement")["CIDM_TrainConceptIncrement"]
    assert list(node["input"]["required"]) == ON_THE_NODE
    assert list(node["input"]["optional"]) == OPTIONAL
    assert node["input"]["optional"]["options"][0] == "CIDM_TRAINING_OPTIONS"
    assert node["input"]["required"]["steps"][1]["default"] == 800
    options = comfy.object_info("CIDM_ConceptTrainingOptions")["CIDM_ConceptTrainingOptions"]
    assert options["output"] == ["CIDM_TRAINING_OPTIONS"]
    assert set(options["input"]["required"]) == set(TRAIN_OPTIONS)


def gets_randomize_control(name: str, spec: dict) -> bool:
    """The frontend's rule (comfyui-frontend-package 1.32.9, useIntWidget): an INT input gets a "control after
    generate: randomize" widget when its spec says so or, unless the spec says false, when it is named seed or
    noise_seed."""
    control = spec.get("control_after_generate")
    return bool(control) if control is not None else name in ("seed", "noise_seed")


def test_no_training_input_is_randomised_after_each_run(comfy):
    info = comfy.object_info()
    for node_id in ("CIDM_TrainConceptIncrement", "CIDM_ConceptTrainingOptions"):
        inputs = {**info[node_id]["input"]["required"], **info[node_id]["input"].get("optional", {})}
        randomised = [name for name, spec in inputs.items()
                      if spec[0] == "INT" and gets_randomize_control(name, spec[1])]
        assert randomised == [], f"{node_id}: {randomised}"
    seed = info["CIDM_ConceptTrainingOptions"]["input"]["required"]["training_seed"]
    assert seed[0] == "INT" and seed[1]["control_after_generate"] is False


def one_image_folder(comfy, name: str) -> str:
    folder = comfy.workspace / "input" / name
    if not folder.exists():
        folder.mkdir(parents=True)
        draw_concept(folder, "dot", count=1)
    return name


def test_without_options_the_defaults_apply(comfy):
    """One step at the default 512 px: the node without options trains exactly what it trains with an options
    node left at its defaults (same hyperparameters, same tensors)."""
    defaults = {name: spec[1]["default"] for name, spec in
                comfy.object_info("CIDM_ConceptTrainingOptions")["CIDM_ConceptTrainingOptions"]["input"]
                ["required"].items()}
    folder = one_image_folder(comfy, "one-dot")
    for library, with_options in (("plain-defaults", False), ("options-defaults", True)):
        graph = Graph()
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        lib = graph.add("CIDM_LoadConceptLibrary", library=library)
        inputs = dict(model=checkpoint[0], clip=checkpoint[1], vae=checkpoint[2], library=lib[0], concept="dot",
                      method="cidm", steps=1, folder=folder)
        if with_options:
            inputs["options"] = graph.add("CIDM_ConceptTrainingOptions", **defaults)[0]
        graph.add("CIDM_TrainConceptIncrement", **inputs)
        comfy.run(graph.prompt(), timeout=900)
    tasks = [json.loads((library_root(comfy, name) / "manifest.json").read_text())["tasks"][0]
             for name in ("plain-defaults", "options-defaults")]
    assert tasks[0]["hyperparameters"] == tasks[1]["hyperparameters"]
    assert tasks[0]["hyperparameters"]["resolution"] == 512 and tasks[0]["rank"] == 4
    weights = [load_file(next(library_root(comfy, name).glob("task_001*.safetensors")))
               for name in ("plain-defaults", "options-defaults")]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][key].equal(weights[1][key]) for key in weights[0])


def test_dataset_image_list_is_one_task(comfy):
    folder = stage(comfy.workspace, "cat")
    count = len([p for p in (comfy.workspace / "input" / folder).iterdir()
                 if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")])
    assert count > 1
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library="from-dataset")
    images = graph.add("LoadImageDataSetFromFolder", folder=folder)
    add_trainer(graph, checkpoint, lib[0], "cat", images=images[0], steps=2)
    comfy.run(graph.prompt())
    manifest = json.loads((library_root(comfy, "from-dataset") / "manifest.json").read_text())
    assert [t["concept"] for t in manifest["tasks"]] == ["cat"]
    assert manifest["tasks"][0]["hyperparameters"]["images"] == count


def test_a_list_of_concepts_is_refused_before_anything_is_written(comfy):
    folder = stage(comfy.workspace, "cat")
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library="listed-concepts")
    dataset = graph.add("LoadImageTextDataSetFromFolder", folder=folder)  # texts: one caption per image
    add_trainer(graph, checkpoint, lib[0], dataset[1], images=dataset[0], steps=2)
    error = comfy.run_expecting_error(graph.prompt())
    assert "concept: expects one value per run, got a list of" in error, error
    root = library_root(comfy, "listed-concepts")
    assert not root.exists() or snapshot(root) == {}
