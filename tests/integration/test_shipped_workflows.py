"""The UI-format workflows in workflows/: what the files carry, their conversion to API format against the real
server's /object_info, and running them (with CPU-sized settings applied at run time, never stored)."""

import json

import numpy as np
import pytest
from PIL import Image

from comfy_host import WORKFLOWS, shipped_prompt, shipped_workflow
from pack_workflows import CKPT, library_root
from workflow_format import WorkflowFormatError, cpu_overrides, notes, to_api, with_overrides

pytestmark = pytest.mark.integration

SHIPPED = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
# what each workflow carries: (checkpoint, training and generation size in pixels)
SETTINGS = {"": ("v1-5-pruned-emaonly.safetensors", 512), "_sdxl": ("sd_xl_base_1.0.safetensors", 1024)}
SDXL_LOADER = "CIDMTest_SmallTowerCheckpointLoader"


def test_the_set_of_workflows():
    assert set(SHIPPED) == {"continual_customization", "method_comparison", "export_concept_lora",
                            "region_composition", "continual_customization_sdxl", "region_composition_sdxl",
                            "region_composition_auto", "continual_evaluation"}


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_is_ui_format_with_thumbnail_and_notes(name):
    workflow = shipped_workflow(name)
    assert isinstance(workflow["version"], float) and workflow["nodes"] and workflow["links"]
    ids = {node["id"] for node in workflow["nodes"]}
    assert len(ids) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(ids)
    for link_id, origin, _, target, _, _ in workflow["links"]:
        assert origin in ids and target in ids, link_id
    assert all(len(text) > 200 for text in notes(workflow)) and notes(workflow)
    with Image.open(WORKFLOWS / f"{name}.jpg") as thumbnail:  # the Templates dialog shows <name>.jpg
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_converts_and_carries_real_settings_of_its_family(comfy, name):
    checkpoint, size = SETTINGS["_sdxl" if name.endswith("_sdxl") else ""]
    prompt = to_api(shipped_workflow(name), comfy.object_info())
    by_class = {}
    for node in prompt.values():
        by_class.setdefault(node["class_type"], []).append(node["inputs"])
    assert [inputs["ckpt_name"] for inputs in by_class["CheckpointLoaderSimple"]] == [checkpoint]
    assert all(inputs["steps"] == 800 for inputs in by_class.get("CIDM_TrainConceptIncrement", []))
    assert all(inputs["resolution"] == size and inputs["token_slots"] == "family default"
               for inputs in by_class.get("CIDM_ConceptTrainingOptions", []))
    assert all(min(inputs["width"], inputs["height"]) == size for inputs in by_class.get("EmptyLatentImage", []))
    samplers = [inputs for kind in ("KSampler", "CIDM_ContextControlledKSampler", "CIDM_EvaluateConceptLibrary")
                for inputs in by_class.get(kind, [])]
    assert samplers and all(inputs["steps"] >= 20 for inputs in samplers)


def test_conversion_refuses_a_node_whose_widgets_do_not_match(comfy):
    workflow = shipped_workflow("export_concept_lora")
    sampler = next(node for node in workflow["nodes"] if node["type"] == "KSampler")
    sampler["widgets_values"].pop()
    with pytest.raises(WorkflowFormatError, match=f"node {sampler['id']} \\(KSampler\\)"):
        to_api(workflow, comfy.object_info())


def test_overrides_change_values_never_links():
    prompt = {"1": {"class_type": "KSampler", "inputs": {"steps": 30, "model": ["2", 0]}},
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768}}}
    prompt["3"] = {"class_type": "CIDM_RegionCondition", "inputs": {"x": 384.0, "y": 0.0, "width": 384.0,
                   "height": 512.0, "units": "pixels", "canvas_width": 768, "canvas_height": 512}}
    changed = with_overrides(prompt, {"KSampler": {"steps": 2, "model": "x"}}, scale_sizes=4)
    assert changed["1"]["inputs"] == {"steps": 2, "model": ["2", 0]}
    assert changed["2"]["inputs"] == {"width": 128, "height": 192}
    # a box in pixels keeps its place on the canvas
    assert changed["3"]["inputs"] == {"x": 96.0, "y": 0.0, "width": 96.0, "height": 128.0, "units": "pixels",
                                      "canvas_width": 192, "canvas_height": 128}
    assert prompt["1"]["inputs"]["steps"] == 30


@pytest.fixture(scope="module")
def continual_run(comfy):
    prompt = shipped_prompt(comfy, "continual_customization", cpu_overrides(CKPT), scale_sizes=8)
    return prompt, comfy.run(prompt, timeout=1800)


def test_continual_customization_trains_three_concepts_then_generates_each(comfy, continual_run):
    prompt, entry = continual_run
    library = next(node["inputs"]["library"] for node in prompt.values()
                   if node["class_type"] == "CIDM_LoadConceptLibrary")
    manifest = json.loads((library_root(comfy, library) / "manifest.json").read_text())
    assert [task["concept"] for task in manifest["tasks"]] == ["dog", "duck", "cat"]
    images = [path for path in comfy.output_files(entry) if path.parent.name == "cidm"]
    assert sorted(path.name.split("_")[0] for path in images) == ["cat", "dog", "duck"]
    for path in images:
        assert Image.open(path).size == (64, 64) and np.asarray(Image.open(path)).std() > 0
    inspect = next(node_id for node_id, node in prompt.items()
                   if node["class_type"] == "CIDM_InspectAggregationWeights")
    table = entry["outputs"][inspect]["text"][0]
    assert all(concept in table for concept in ("dog", "duck", "cat"))


def test_continual_customization_runs_twice_and_trains_nothing_the_second_time(comfy, continual_run):
    prompt, _ = continual_run
    root = library_root(comfy, "my-concepts")
    before = {path.name: path.stat().st_mtime_ns for path in root.glob("task_*.safetensors")}
    trained, reused = comfy.log().count("CIDM train "), comfy.log().count("nothing was trained")
    comfy.run(prompt, timeout=1800)  # the library changed since the first run, so the training nodes run again
    assert {path.name: path.stat().st_mtime_ns for path in root.glob("task_*.safetensors")} == before
    assert comfy.log().count("CIDM train ") == trained
    assert comfy.log().count("nothing was trained") == reused + 3


def test_export_workflow_uses_the_concept_in_a_plain_graph(comfy, continual_run):
    entry = comfy.run(shipped_prompt(comfy, "export_concept_lora", cpu_overrides(CKPT), scale_sizes=8))
    assert (comfy.workspace / "models" / "loras" / "my-concepts_dog.safetensors").is_file()
    (image,) = [path for path in comfy.output_files(entry) if path.name.startswith("exported_dog")]
    assert np.asarray(Image.open(image)).std() > 0


def test_region_composition_composes_the_trained_concepts(comfy, continual_run):
    prompt = shipped_prompt(comfy, "region_composition", cpu_overrides(CKPT), scale_sizes=8)
    entry = comfy.run(prompt)
    (image,) = [path for path in comfy.output_files(entry) if path.name.startswith("composition")]
    assert Image.open(image).size == (96, 64) and np.asarray(Image.open(image)).std() > 0
    regions = [node_id for node_id, node in prompt.items() if node["class_type"] == "CIDM_RegionCondition"]
    assert len(regions) == 2 and all(entry["outputs"][node_id]["images"] for node_id in regions)  # layouts


def test_region_composition_auto_composes_with_no_region_drawn(comfy, continual_run):
    """The automatic-regions variant runs and shows its masks and layout. The mini test checkpoint has one UNet
    level, so no layer works at a quarter of the latent: the sampler says so on the node and samples without
    regions (tests/integration/test_auto_regions.py places concepts on the 16-layer checkpoint)."""
    prompt = shipped_prompt(comfy, "region_composition_auto", cpu_overrides(CKPT), scale_sizes=8)
    entry = comfy.run(prompt)
    (image,) = [path for path in comfy.output_files(entry) if path.name.startswith("composition_auto")]
    assert Image.open(image).size == (96, 64) and np.asarray(Image.open(image)).std() > 0
    (sampler,) = [i for i, node in prompt.items() if node["class_type"] == "CIDM_ContextControlledKSampler"]
    assert entry["outputs"][sampler]["images"], "no layout preview on the sampler"
    (note,) = entry["outputs"][sampler]["text"]
    assert "no cross-attention layer at a quarter of the latent's size" in note and "without them" in note
    previews = [i for i, node in prompt.items() if node["class_type"] in ("PreviewImage", "MaskPreview")]
    assert len(previews) == 2 and all(entry["outputs"][i]["images"] for i in previews)


def test_sdxl_workflows_train_generate_and_compose_on_an_sdxl_checkpoint(comfy, sdxl_checkpoint):
    """The SDXL continual customization then region composition, with CPU-sized settings on the `sdxl-blocks` test
    checkpoint (its small text towers through the test loader): three concepts land in an SDXL library, each is
    generated, then two are composed."""
    overrides = cpu_overrides(sdxl_checkpoint, training_steps=1, sampling_steps=1, loader=SDXL_LOADER)
    prompt = shipped_prompt(comfy, "continual_customization_sdxl", overrides, scale_sizes=16)
    entry = comfy.run(prompt, timeout=1800)
    manifest = json.loads((library_root(comfy, "my-sdxl-concepts") / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == "SDXL" and max(manifest["base_model"]["token_slots"]) == 10
    assert [task["concept"] for task in manifest["tasks"]] == ["dog", "duck", "cat"]
    images = [path for path in comfy.output_files(entry) if path.parent.name == "cidm"]
    assert sorted(path.name.split("_")[0] for path in images) == ["cat", "dog", "duck"]
    assert all(Image.open(path).size == (64, 64) for path in images)
    entry = comfy.run(shipped_prompt(comfy, "region_composition_sdxl", overrides, scale_sizes=16))
    (image,) = [path for path in comfy.output_files(entry) if path.name.startswith("composition_sdxl")]
    assert Image.open(image).size == (96, 64) and np.asarray(Image.open(image)).std() > 0


@pytest.mark.slow
def test_method_comparison_trains_each_method_into_its_own_library(comfy):
    prompt = shipped_prompt(comfy, "method_comparison", cpu_overrides(CKPT), scale_sizes=8)
    entry = comfy.run(prompt, timeout=3600)
    for method in ("cidm", "c-lora", "finetune"):
        manifest = json.loads((library_root(comfy, f"compare-{method}") / "manifest.json").read_text())
        assert [(t["concept"], t["method"]) for t in manifest["tasks"]] == [("dog", method), ("duck", method)]
    saved = sorted(path.name.rsplit("_", 2)[0] for path in comfy.output_files(entry) if path.parent.name == "cidm")
    assert saved == ["compare_c-lora", "compare_cidm", "compare_finetune"]


@pytest.mark.slow  # about 3 minutes on 2 idle cores (three trainings); the node's own tests run by default
def test_continual_evaluation_scores_every_concept_after_each_task_and_keeps_the_history(comfy):
    """The library goes Train → Evaluate → Train → …, so each evaluation sees its own revision; the last report
    holds every concept after each later task. The CLIP vision file is swapped for a random-weight model made at
    test time (the frontend has no file to offer here)."""
    overrides = {**cpu_overrides(CKPT), "CLIPVisionLoader": {"class_type": "CIDMTest_SmallClipVision"}}
    prompt = shipped_prompt(comfy, "continual_evaluation", overrides, scale_sizes=8)
    entry = comfy.run(prompt, timeout=1800)
    root = library_root(comfy, "my-concepts-evaluated")
    history = json.loads((root / "evaluations.json").read_text())["evaluations"]
    assert [e["tasks"] for e in history] == [1, 2, 3]
    assert [sorted(e["scores"]) for e in history] == [["dog"], ["dog", "duck"], ["cat", "dog", "duck"]]
    assert all(s["references"].endswith(("from dog", "from duck_toy", "from cat")) and "training images" in
               s["references"] for e in history for s in e["scores"].values())
    reports = [entry["outputs"][i]["text"][0] for i, node in prompt.items()
               if node["class_type"] == "CIDM_EvaluateConceptLibrary"]
    assert len(reports) == 3
    assert sum("| IA | after 1 task | after 2 tasks | after 3 tasks | forgetting |" in r for r in reports) == 1
    assert all(entry["outputs"][i]["images"] for i, node in prompt.items() if node["class_type"] == "PreviewImage")
