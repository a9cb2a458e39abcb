"""Train Concept Increment and Export Concept LoRA in the real server, on CIFC concepts and the mini checkpoint."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import Graph, WorkflowFailed, ensure_checkpoint, sample_image, stage
from pack_workflows import CKPT, LIBRARY, library_root, pixels, snapshot, train_graph

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_library(comfy):
    """Two CIFC concepts trained in sequence; returns the snapshot taken after task 1."""
    root = library_root(comfy, LIBRARY)
    entry = comfy.run(train_graph(LIBRARY, "dog", stage(comfy.workspace, "dog")).prompt())
    assert any(p.name.startswith("loss_dog") for p in comfy.output_files(entry))
    after_first = snapshot(root)
    comfy.run(train_graph(LIBRARY, "duck", stage(comfy.workspace, "duck_toy"), method="c-lora",
                          tokens="<duck1> <duck2> <duck3>", class_words="duck toy", training_seed=1).prompt())
    return after_first


def test_two_concepts_in_sequence_leave_task_one_untouched(comfy, trained_library):
    root = library_root(comfy, LIBRARY)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [t["concept"] for t in manifest["tasks"]] == ["dog", "duck"]
    assert [t["method"] for t in manifest["tasks"]] == ["cidm", "c-lora"]
    assert manifest["tasks"][1]["tokens"] == ["<duck1>", "<duck2>", "<duck3>"]
    assert manifest["tasks"][1]["hyperparameters"]["class_words"] == [], "c-lora ignores the class words given"
    first = [name for name in trained_library if name.startswith("task_001")]
    assert first and all(snapshot(root)[name] == trained_library[name] for name in first)
    sizes = [p.stat().st_size for p in root.glob("task_*.safetensors")]
    assert len(sizes) == 2 and max(sizes) < 1_000_000


def test_exported_lora_loads_in_stock_loraloader_and_changes_output(comfy, trained_library):
    export = Graph()
    lib = export.add("CIDM_LoadConceptLibrary", library=LIBRARY)
    export.add("CIDM_ExportConceptLoRA", library=lib[0], concept="dog", filename="")
    entry = comfy.run(export.prompt())
    lora_file = comfy.workspace / "models" / "loras" / f"{LIBRARY}_dog.safetensors"
    assert lora_file.is_file(), entry

    def sample(with_lora: bool):
        graph = Graph()
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        model, clip = checkpoint[0], checkpoint[1]
        if with_lora:
            loaded = graph.add("LoraLoader", model=model, clip=clip, lora_name=lora_file.name,
                               strength_model=1.0, strength_clip=1.0)
            model = loaded[0]
        sample_image(graph, model, clip, checkpoint[2], "a photo of a dog", prefix=f"export_{with_lora}")
        return pixels(comfy, comfy.run(graph.prompt()))

    base, adapted = sample(False), sample(True)
    assert np.abs(base - adapted).mean() > 0.5
    assert "lora key not loaded" not in comfy.log()


def test_concept_as_lora_in_one_graph_equals_export_then_loraloader(comfy, trained_library):
    """Load Concept as LoRA applies exactly what Export Concept LoRA writes and LoraLoaderModelOnly loads."""
    export = Graph()
    lib = export.add("CIDM_LoadConceptLibrary", library=LIBRARY)
    export.add("CIDM_ExportConceptLoRA", library=lib[0], concept="duck", filename="one_graph_duck")
    comfy.run(export.prompt())

    def sample(loader: str):
        graph = Graph()
        checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        if loader == "file":
            model = graph.add("LoraLoaderModelOnly", model=checkpoint[0], lora_name="one_graph_duck.safetensors",
                              strength_model=0.8)[0]
        else:
            library = graph.add("CIDM_LoadConceptLibrary", library=LIBRARY)
            model = graph.add("CIDM_LoadConceptAsLoRA", model=checkpoint[0], library=library[0], concept="duck",
                              strength_model=0.8)[0]
        sample_image(graph, model, checkpoint[1], checkpoint[2], "a photo of a duck toy", prefix=f"as_lora_{loader}")
        return pixels(comfy, comfy.run(graph.prompt()))

    in_graph, from_file = sample("library"), sample("file")
    base = Graph()
    checkpoint = base.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    sample_image(base, checkpoint[0], checkpoint[1], checkpoint[2], "a photo of a duck toy", prefix="as_lora_base")
    assert np.array_equal(in_graph, from_file)
    assert np.abs(in_graph - pixels(comfy, comfy.run(base.prompt()))).mean() > 0.5


def test_interrupt_keeps_library_and_resume_completes(comfy, trained_library):
    root = library_root(comfy, LIBRARY)
    before = snapshot(root)
    settings = dict(steps=24, save_every=5, resume=True, training_seed=3)
    folder = stage(comfy.workspace, "cat")
    prompt_id = comfy.submit(train_graph(LIBRARY, "cat", folder, **settings).prompt())
    comfy.wait_for_log("CIDM train 'cat': step 10/24")
    comfy.interrupt()
    with pytest.raises(WorkflowFailed):
        comfy.wait(prompt_id)
    assert snapshot(root) == before
    assert (root / ".resume" / "cat.safetensors").is_file()
    comfy.run(train_graph(LIBRARY, "cat", folder, **settings).prompt())
    log = comfy.log()
    assert "CIDM: resuming 'cat' at step" in log
    manifest = json.loads((root / "manifest.json").read_text())
    assert [t["concept"] for t in manifest["tasks"]] == ["dog", "duck", "cat"]
    assert not (root / ".resume" / "cat.safetensors").exists()
    assert all(snapshot(root)[name] == digest for name, digest in before.items() if name.startswith("task_"))


BAD_INPUTS = [
    # (concept, folder maker, overrides, input named in the error, text in the error)
    ("empty", lambda ws: (ws / "input" / "empty").mkdir(parents=True, exist_ok=True) or "empty", {},
     "folder", "no images"),
    ("junk", lambda ws: _junk_folder(ws), {}, "folder", "notes.pdf is not an image"),
    ("collide", lambda ws: stage(ws, "cat"), {"tokens": "<DOG#1> <new2>"}, "tokens", "<DOG#1>"),
    ("dog", lambda ws: stage(ws, "cat"), {"tokens": "<dogb1>"}, "concept", "already holds 'dog' as task 1"),
    ("escape", lambda ws: "../../etc", {}, "folder", "outside ComfyUI's input directory"),
    ("../evil", lambda ws: stage(ws, "cat"), {}, "concept", ""),
]


def _junk_folder(ws: Path) -> str:
    folder = ws / "input" / "junk"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    Image.new("RGB", (96, 96)).save(folder / "ok.png")
    return "junk"


@pytest.mark.parametrize("concept, make_folder, overrides, input_name, message", BAD_INPUTS,
                         ids=[case[0].strip("./") + "-" + case[3] for case in BAD_INPUTS])
def test_bad_input_names_the_input_and_keeps_library(comfy, trained_library, concept, make_folder, overrides,
                                                     input_name, message):
    root = library_root(comfy, LIBRARY)
    before = snapshot(root)
    error = comfy.run_expecting_error(train_graph(LIBRARY, concept, make_folder(comfy.workspace),
                                                  **overrides).prompt())
    assert f"'{input_name}'" in error or f"{input_name}:" in error, error
    assert message in error
    assert snapshot(root) == before


def test_steps_below_one_are_rejected_before_running(comfy, trained_library):
    with pytest.raises(WorkflowFailed, match="steps"):
        comfy.submit(train_graph(LIBRARY, "zero", stage(comfy.workspace, "cat"), steps=0).prompt())


def test_library_from_another_base_model_is_refused(comfy, trained_library):
    root = library_root(comfy, LIBRARY)
    before = snapshot(root)
    error = comfy.run_expecting_error(train_graph(LIBRARY, "cat16", stage(comfy.workspace, "cat"),
                                                  ckpt="cidm_sd15_blocks.safetensors").prompt())
    assert "base model" in error and "library" in error
    assert snapshot(root) == before


def test_corrupt_manifest_is_reported_not_overwritten(comfy, trained_library):
    broken = library_root(comfy, "broken")
    shutil.copytree(library_root(comfy, LIBRARY), broken)
    (broken / "manifest.json").write_text("{ not json")
    before = snapshot(broken)
    error = comfy.run_expecting_error(train_graph("broken", "cat", stage(comfy.workspace, "cat")).prompt())
    assert "corrupt" in error and "library" in error
    assert snapshot(broken) == before


def test_library_name_with_dots_is_refused(comfy):
    error = comfy.run_expecting_error(train_graph("../outside", "cat", "cifc/cat").prompt())
    assert "library" in error
    assert not (comfy.workspace / "models" / "outside").exists()


@pytest.mark.slow
def test_sixteen_layer_training_with_gradient_checkpointing(comfy):
    ckpt = "cidm_sd15_blocks.safetensors"
    folder = stage(comfy.workspace, "teddybear")
    for concept, method in (("teddy", "cidm"), ("teddy_b", "cidm-official")):
        comfy.run(train_graph("sixteen-trained", concept, folder, ckpt=ckpt, method=method, steps=6, resolution=128,
                              gradient_checkpointing=method == "cidm").prompt())
    manifest = json.loads((library_root(comfy, "sixteen-trained") / "manifest.json").read_text())
    assert manifest["base_model"]["num_layers"] == 16
    assert [t["method"] for t in manifest["tasks"]] == ["cidm", "cidm-official"]
    task_files = sorted(library_root(comfy, "sixteen-trained").glob("task_*.safetensors"))
    assert len(task_files) == 2 and all(p.stat().st_size < 1_000_000 for p in task_files)


def test_loss_text_and_preview_samples_are_shown_on_the_node(comfy):
    graph = train_graph("previewed", "cat", stage(comfy.workspace, "cat"), steps=2, preview_every=1)
    trainer = next(node for node, spec in graph.nodes.items() if spec["class_type"] == "CIDM_TrainConceptIncrement")
    with comfy.listen() as events:
        prompt_id = comfy.submit(graph.prompt(), events.client_id)
        entry = comfy.wait(prompt_id)
        events.wait_finished(prompt_id)
    assert [text.split("\n")[0] for text in events.progress_texts(trainer)] == ["step 1/2", "step 2/2"]
    assert all("loss" in text for text in events.progress_texts(trainer))
    shown = entry["outputs"][trainer]["images"]
    assert len(shown) == 2 and all(item["type"] == "temp" for item in shown)
    for item in shown:
        preview = np.asarray(Image.open(comfy.workspace / "temp" / item["subfolder"] / item["filename"]))
        assert preview.shape == (64, 64, 3) and preview.std() > 0


def test_model_that_is_not_sd15_layout_is_refused(comfy):
    unet_dir = comfy.workspace / "models" / "diffusion_models"
    unet_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ensure_checkpoint("mini-sd2"), unet_dir / "cidm_mini_sd2.safetensors")
    graph = train_graph("sd2-library", "cat", stage(comfy.workspace, "cat"))
    trainer = next(spec for spec in graph.nodes.values() if spec["class_type"] == "CIDM_TrainConceptIncrement")
    trainer["inputs"]["model"] = graph.add("UNETLoader", unet_name="cidm_mini_sd2.safetensors",
                                           weight_dtype="default")[0].link
    error = comfy.run_expecting_error(graph.prompt())
    assert "model:" in error and "1024" in error and "SD1.5" in error, error
    assert not library_root(comfy, "sd2-library").exists()
