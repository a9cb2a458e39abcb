"""Train Concept Increment on SDXL in the real server (issue 30, item 3), on the generated `sdxl-blocks` checkpoint
(70 cross-attention layers, 3-layer text towers) at 64 px and two or three steps: the task lands in a library that
records the SDXL family, the UNet gets its ADM input (pooled text and sizes), a v-prediction checkpoint (the
`v_pred` key, comfy/supported_models.py:197-215, v0.3.75) trains through its own target, and interrupt, resume,
gradient checkpointing, previews and the loss plot work as on SD1.5."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from comfy_host import Graph, WorkflowFailed, stage
from pack_workflows import add_trainer, library_root, snapshot

pytestmark = pytest.mark.integration

LIBRARY = "sdxl-continual"
STEPS = 2


def sdxl_train_graph(ckpt: str, library: str, concept: str, folder: str, **settings):
    """(graph, trainer node id, Describe node id): Train Concept Increment on an SDXL test checkpoint, its loss plot
    saved, and what the loaded MODEL is."""
    graph = Graph()
    checkpoint = graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=ckpt)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    trained = add_trainer(graph, checkpoint, lib[0], concept, folder, **settings)
    graph.add("SaveImage", images=trained[1], filename_prefix=f"loss_sdxl_{concept}")
    describe = graph.add("CIDMTest_Describe", model=checkpoint[0])
    return graph, trained.id, describe.id


def task_tensors(root: Path, index: int) -> dict[str, torch.Tensor]:
    (path,) = root.glob(f"task_{index:03d}_*.safetensors")
    return load_file(str(path))


def v_prediction_copy(comfy, ckpt: str) -> str:
    """The checkpoint with NoobAI's `v_pred` marker key added (which makes ComfyUI load it as V_PREDICTION)."""
    name = ckpt.replace(".safetensors", "_vpred.safetensors")
    target = comfy.workspace / "models" / "checkpoints" / name
    if not target.exists():
        tensors = load_numpy(str(comfy.workspace / "models" / "checkpoints" / ckpt))
        save_numpy({**tensors, "v_pred": np.zeros(0, dtype=np.float32)}, str(target))
    return name


@pytest.fixture(scope="module")
def eps_run(comfy, sdxl_checkpoint):
    """'dog' trained as task 1 on the eps checkpoint, with a preview at the last step: (history entry, trainer
    id, Describe id)."""
    graph, trainer, describe = sdxl_train_graph(sdxl_checkpoint, LIBRARY, "dog", stage(comfy.workspace, "dog"),
                                                steps=STEPS, preview_every=STEPS)
    return comfy.run(graph.prompt(), timeout=900), trainer, describe


def test_task_records_the_sdxl_family_and_both_towers(comfy, eps_run):
    entry, trainer, describe = eps_run
    assert entry["outputs"][describe]["model"][0]["model_type"] == "EPS"
    root = library_root(comfy, LIBRARY)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == "SDXL" and manifest["base_model"]["num_layers"] == 70
    (task,) = manifest["tasks"]
    assert task["concept"] == "dog" and task["hyperparameters"]["resolution"] == 64
    # The freeze rule reads CLIP-L's part of each [l | g] row: the whole row of a random start (σ 0.013 over 2048
    # features, norm 0.59) is past the 0.55 threshold already, which froze SDXL tokens after their first step.
    assert task["hyperparameters"]["embeddings_frozen_at"] is None
    tensors = task_tensors(root, 1)
    # SDXL's default token slots: one per transformer stack, 11 for the 70 layers (cidm.family.SDXL), recorded
    slots = manifest["base_model"]["token_slots"]
    assert len(slots) == 70 and max(slots) == 10 and slots[:4] == [0, 0, 1, 1]
    assert tuple(tensors["tokens.embeddings"].shape) == (2, 11, 768 + 1280)  # [l | g] per slot
    assert tuple(tensors["tokens.features"].shape) == (2, 70, 768 + 1280)  # routing reads every layer
    assert all(tensor.isfinite().all() for tensor in tensors.values())
    # the loss plot, and the preview shown on the node: sampled with the ADM input at the training size
    assert any(path.name.startswith("loss_sdxl_dog") for path in comfy.output_files(entry))
    (shown,) = entry["outputs"][trainer]["images"]
    preview = np.asarray(Image.open(comfy.workspace / "temp" / shown["subfolder"] / shown["filename"]))
    assert preview.shape == (64, 64, 3) and preview.std() > 0


def test_token_slot_rule_per_layer_makes_70_slots_and_a_library_keeps_its_own(comfy, sdxl_checkpoint, eps_run):
    """'per layer' gives a new library one slot per layer; a library's map is fixed by its first task, so asking
    the 11-slot library for another rule is refused, naming the input, before any training."""
    graph, _, _ = sdxl_train_graph(sdxl_checkpoint, "sdxl-per-layer", "dog", stage(comfy.workspace, "dog"), steps=1,
                                   token_slots="per layer")
    comfy.run(graph.prompt(), timeout=900)
    root = library_root(comfy, "sdxl-per-layer")
    assert json.loads((root / "manifest.json").read_text())["base_model"]["token_slots"] == list(range(70))
    assert tuple(task_tensors(root, 1)["tokens.embeddings"].shape) == (2, 70, 2048)
    before = snapshot(library_root(comfy, LIBRARY))
    graph, _, _ = sdxl_train_graph(sdxl_checkpoint, LIBRARY, "bird", stage(comfy.workspace, "dog"), steps=1,
                                   token_slots="per layer")
    with pytest.raises(WorkflowFailed, match=r"token_slots: library 'sdxl-continual' has 11 token slots for 70 "
                                             r"layers.*'per layer' gives 70"):
        comfy.run(graph.prompt(), timeout=900)
    assert snapshot(library_root(comfy, LIBRARY)) == before


def test_v_prediction_checkpoint_trains_through_its_own_target(comfy, sdxl_checkpoint, eps_run):
    """The same inputs on the same weights, loaded as V_PREDICTION, train another task: the target follows the
    model's parameterisation."""
    name = v_prediction_copy(comfy, sdxl_checkpoint)
    graph, _, describe = sdxl_train_graph(name, "sdxl-vpred", "dog", stage(comfy.workspace, "dog"), steps=STEPS)
    entry = comfy.run(graph.prompt(), timeout=900)
    assert entry["outputs"][describe]["model"][0]["model_type"] == "V_PREDICTION"
    eps, vpred = task_tensors(library_root(comfy, LIBRARY), 1), task_tensors(library_root(comfy, "sdxl-vpred"), 1)
    assert eps.keys() == vpred.keys() and all(tensor.isfinite().all() for tensor in vpred.values())
    changed = [key for key in eps if key.startswith("lora.") and not torch.equal(eps[key], vpred[key])]
    assert changed and not torch.equal(eps["tokens.embeddings"], vpred["tokens.embeddings"])


@pytest.mark.slow  # about 11 minutes on 2 shared cores: 4+ SDXL steps with gradient checkpointing and two loads
def test_interrupt_keeps_library_and_resume_completes_with_gradient_checkpointing(comfy, sdxl_checkpoint, eps_run):
    root = library_root(comfy, LIBRARY)
    before = snapshot(root)
    resume_file = root / ".resume" / "cat.safetensors"
    graph, _, _ = sdxl_train_graph(sdxl_checkpoint, LIBRARY, "cat", stage(comfy.workspace, "cat"), steps=4,
                                   save_every=1, resume=True, training_seed=3, gradient_checkpointing=True)
    prompt_id = comfy.submit(graph.prompt())
    deadline = time.time() + 600
    while not resume_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    comfy.interrupt()
    with pytest.raises(WorkflowFailed):
        comfy.wait(prompt_id)
    assert snapshot(root) == before and resume_file.is_file()
    comfy.run(graph.prompt(), timeout=900)
    assert "CIDM: resuming 'cat' at step" in comfy.log()
    manifest = json.loads((root / "manifest.json").read_text())
    assert [t["concept"] for t in manifest["tasks"]] == ["dog", "cat"]
    assert not resume_file.exists()
    assert all(snapshot(root)[name] == digest for name, digest in before.items() if name.startswith("task_"))
    assert tuple(task_tensors(root, 2)["tokens.embeddings"].shape) == (2, 11, 2048)
