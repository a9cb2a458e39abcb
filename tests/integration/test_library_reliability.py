"""What is on disk decides what ComfyUI caches, a workflow runs twice, and a server killed mid-save leaves a
library that the next open cleans up (issue 16 kinds 1 and 3, issue 15 item 2), in the real server."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from comfy_host import ComfyServer, Graph, WorkflowFailed, ensure_checkpoint, sample_image, stage
from pack_workflows import CKPT, library_root, pixels, snapshot, train_graph
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

FAULTS = Path(__file__).parents[1] / "faults"


def trainer_id(graph: Graph) -> str:
    return next(node for node, spec in graph.nodes.items() if spec["class_type"] == "CIDM_TrainConceptIncrement")


def test_workflow_run_twice_unchanged_trains_nothing_the_second_time(comfy):
    graph = train_graph("rerun", "dog", stage(comfy.workspace, "dog"))
    comfy.run(graph.prompt())
    root = library_root(comfy, "rerun")
    before = snapshot(root)
    with comfy.listen() as events:
        prompt_id = comfy.submit(graph.prompt(), events.client_id)
        comfy.wait(prompt_id)
        events.wait_finished(prompt_id)
    assert snapshot(root) == before
    (text,) = events.progress_texts(trainer_id(graph))
    assert "already task 1" in text and "nothing was trained" in text
    assert comfy.log().count("CIDM train 'dog': step 3/3") == 1


def test_changed_input_for_an_existing_concept_names_what_changed(comfy):
    folder = stage(comfy.workspace, "dog")
    comfy.run(train_graph("changed", "dog", folder).prompt())
    before = snapshot(library_root(comfy, "changed"))
    error = comfy.run_expecting_error(train_graph("changed", "dog", folder, steps=4, training_seed=2).prompt())
    assert "concept:" in error and "steps 3 -> 4" in error and "training_seed 0 -> 2" in error, error
    assert "new name" in error
    assert snapshot(library_root(comfy, "changed")) == before


def test_deleted_library_is_trained_again(comfy):
    graph = train_graph("deleted", "dog", stage(comfy.workspace, "dog"))
    comfy.run(graph.prompt())
    shutil.rmtree(library_root(comfy, "deleted"))
    comfy.run(graph.prompt())
    manifest = json.loads((library_root(comfy, "deleted") / "manifest.json").read_text())
    assert [task["concept"] for task in manifest["tasks"]] == ["dog"]


def test_interrupted_first_training_leaves_no_library(comfy):
    prompt_id = comfy.submit(train_graph("interrupted", "dog", stage(comfy.workspace, "dog"), steps=500,
                                         save_every=100, resume=True).prompt())
    comfy.wait_for_log("CIDM train 'dog': step 10/500")
    comfy.interrupt()
    with pytest.raises(WorkflowFailed):
        comfy.wait(prompt_id)
    assert not library_root(comfy, "interrupted").exists()


def test_swapped_library_with_the_same_revision_is_read_again(comfy):
    checkpoint_path = ensure_checkpoint("mini")
    root = library_root(comfy, "swapped")
    contents = {}
    for seed in (0, 1):
        contents[seed] = comfy.workspace / f"library-seed{seed}"
        synthesize_library(checkpoint_path, contents[seed] / "swapped", ["dog"], seed=seed, lora_std=0.5)

    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library="swapped")
    patched = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], tasks="all", scale=1.0,
                        mode="elastic", weights="", uncond_weights="match cond")
    positive = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text="a photo of a <dog>")
    sample_image(graph, patched[0], checkpoint[1], checkpoint[2], prefix="swapped", positive_cond=positive[0])

    images = []
    for seed in (0, 1, 0):
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(contents[seed] / "swapped", root)
        images.append(pixels(comfy, comfy.run(graph.prompt())))
    assert np.abs(images[0] - images[1]).mean() > 0.5
    assert np.array_equal(images[0], images[2])


def wait_for(path: Path, server: ComfyServer, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline or server.process.poll() is not None:
            raise AssertionError(f"the server did not reach the paused save:\n{server.log()[-3000:]}")
        time.sleep(0.1)


KILLS = [
    # (pause before/after the n-th replace of this file, what the kill leaves, what the re-run logs)
    ("before", "manifest.json", 2, {".manifest.json.*.tmp", "task_001_cat.safetensors", ".resume/cat.safetensors"},
     "resuming 'cat' at step 2"),
    ("after", "manifest.json", 2, {"task_001_cat.safetensors", ".resume/cat.safetensors"}, "nothing was trained"),
    ("before", "cat.safetensors", 2, {".resume/.cat.safetensors.*.tmp", ".resume/cat.safetensors"},
     "resuming 'cat' at step 1"),
]


@pytest.mark.parametrize("when, name, nth, left, rerun", KILLS, ids=["task-appended", "manifest-written",
                                                                    "resume-save"])
def test_server_killed_mid_save_leaves_a_library_the_next_run_cleans(tmp_path, when, name, nth, left, rerun):
    """kill -9 lands while the library is being written (paused there by tests/faults/sitecustomize.py); the
    restarted server's next run of the same workflow sweeps the leftovers and finishes the task."""
    checkpoints = {CKPT: ensure_checkpoint("mini")}
    flag = tmp_path / "paused"
    env = {"PYTHONPATH": str(FAULTS), "CIDM_PAUSE_AT_REPLACE": f"{when}:{name}:{nth}:{flag}"}
    graph = train_graph("killed", "cat", stage(tmp_path, "cat"), steps=3, save_every=1, resume=True)
    server = ComfyServer(tmp_path, checkpoints, env).start()
    try:
        server.submit(graph.prompt())
        wait_for(flag, server)
        server.process.kill()
        server.process.wait(30)
    finally:
        server.stop()
    root = tmp_path / "models" / "cidm" / "killed"
    found = {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()} - {"manifest.json", ".lock"}
    assert len(found) == len(left) and all(any(Path(p).match(pattern) for p in found) for pattern in left), found

    restarted = ComfyServer(tmp_path, checkpoints).start()
    try:
        with restarted.listen() as events:
            prompt_id = restarted.submit(graph.prompt(), events.client_id)
            restarted.wait(prompt_id)
            events.wait_finished(prompt_id)
        log = restarted.log() + "\n".join(events.progress_texts(trainer_id(graph)))
    finally:
        restarted.stop()
    assert rerun in log, log[-3000:]
    manifest = json.loads((root / "manifest.json").read_text())
    assert [task["concept"] for task in manifest["tasks"]] == ["cat"]
    remaining = {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}
    assert remaining == {"manifest.json", ".lock", "task_001_cat.safetensors"}, remaining
