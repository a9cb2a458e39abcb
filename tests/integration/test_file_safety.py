"""The user's files are safe in the real server (issue 29): Export Concept LoRA never overwrites a file it did not
write for the same task (kind 2), and Train Concept Increment refuses a library folder that cannot take the task
before it trains, naming the folder, and leaves nothing behind (kind 4)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from comfy_host import Graph, stage
from fs_faults import nearly_full, read_only
from pack_workflows import CKPT, library_root, snapshot, train_graph
from synthetic import synthesize_library

pytestmark = pytest.mark.integration


def export_graph(library: str, concept: str, filename: str) -> tuple[Graph, str]:
    graph = Graph()
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    node = graph.add("CIDM_ExportConceptLoRA", library=lib[0], concept=concept, filename=filename)
    return graph, node.id


def test_export_never_overwrites_a_file_it_did_not_write_for_the_same_task(comfy):
    checkpoint = comfy.workspace / "models" / "checkpoints" / CKPT
    synthesize_library(checkpoint, library_root(comfy, "keep"), ["dog", "cat"])
    loras = comfy.workspace / "models" / "loras"
    users = {"keep_dog.safetensors": b"the user's own LoRA", "mine.safetensors": b"another of the user's files"}
    for name, content in users.items():
        (loras / name).write_bytes(content)

    for filename, existing in (("", "keep_dog.safetensors"), ("mine", "mine.safetensors")):
        error = comfy.run_expecting_error(export_graph("keep", "dog", filename)[0].prompt())
        assert "filename:" in error and str(loras / existing) in error and "never overwritten" in error, error
        assert "new name" in error
    assert {name: (loras / name).read_bytes() for name in users} == users

    graph, node = export_graph("keep", "dog", "keep_dog_export")
    entry = comfy.run(graph.prompt())
    written = loras / "keep_dog_export.safetensors"
    (text,) = entry["outputs"][node]["text"]
    assert str(written) in text and "'dog'" in text and "replacing" not in text, text
    assert f"CIDM: wrote {written}" in comfy.log()
    assert written.stat().st_mode & 0o777 == 0o644  # the server's umask is 022: readable by everything sharing it
    assert not [p.name for p in loras.iterdir() if p.name.startswith(".")]  # no temp file left
    first = load_file(str(written))

    # Another task, into the same file: refused; the same task again (a changed input makes ComfyUI run the node):
    # it replaces its own export and says so.
    error = comfy.run_expecting_error(export_graph("keep", "cat", "keep_dog_export")[0].prompt())
    assert "this pack's export of 'dog' from library 'keep'" in error, error
    graph, node = export_graph("keep", " dog", "keep_dog_export")
    (text,) = comfy.run(graph.prompt())["outputs"][node]["text"]
    assert "replacing this same task's earlier export" in text, text
    again = load_file(str(written))
    assert again.keys() == first.keys() and all(torch.equal(again[key], first[key]) for key in first)


def test_read_only_library_is_refused_before_training(comfy):
    root = library_root(comfy, "readonly")
    synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, root, ["cat"])
    before, trained = snapshot(root), comfy.log().count("CIDM train 'dog': step")
    with read_only(root):
        error = comfy.run_expecting_error(train_graph("readonly", "dog", stage(comfy.workspace, "dog")).prompt())
    assert f"library: cannot create files in {root}" in error and "writable" in error, error
    assert comfy.log().count("CIDM train 'dog': step") == trained  # refused before the first step
    assert snapshot(root) == before


def test_nearly_full_drive_is_refused_before_training_and_leaves_nothing(comfy):
    root = library_root(comfy, "fulldisk")
    trained = comfy.log().count("CIDM train 'dog': step")
    with nearly_full(root, free=64 << 10):
        error = comfy.run_expecting_error(train_graph("fulldisk", "dog", stage(comfy.workspace, "dog")).prompt())
        assert f"library: {root} needs" in error and "free space" in error, error
        assert [path.name for path in root.iterdir()] == ["filler"]  # no manifest, lock or task file
    assert comfy.log().count("CIDM train 'dog': step") == trained
    assert "fulldisk" not in json.dumps(comfy.object_info("CIDM_LoadConceptLibrary"))
