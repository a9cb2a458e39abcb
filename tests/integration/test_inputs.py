"""Bad node inputs in the real server: each gives an error that names the input, before any work is done."""

import math

import pytest

from comfy_host import Graph, draw_concept
from pack_workflows import CKPT, TRAIN_DEFAULTS, library_root, train_graph

pytestmark = pytest.mark.integration


def train_graph_with(images=None, **overrides):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library="finite_checks")
    inputs = {**TRAIN_DEFAULTS, **overrides}
    if images is not None:
        inputs["images"] = images(graph)
    graph.add("CIDM_TrainConceptIncrement", model=checkpoint[0], clip=checkpoint[1], vae=checkpoint[2],
              library=lib[0], concept="dog", folder="", **inputs)
    return graph


@pytest.mark.parametrize("name", ["alpha", "lora_lr", "orthogonal_weight", "clora_lambda"])
def test_train_refuses_nan_float_inputs(comfy, name):
    error = comfy.run_expecting_error(train_graph_with(**{name: math.nan}).prompt())
    assert f"{name}: must be a finite number" in error
    assert not (comfy.workspace / "models" / "cidm" / "finite_checks").exists()


def test_train_refuses_a_nan_image_batch(comfy):
    def nan_images(graph):  # ComfyUI's own SolidMask passes NaN through its [0, 1] range check
        mask = graph.add("SolidMask", value=math.nan, width=64, height=64)
        return graph.add("MaskToImage", mask=mask[0])[0]
    error = comfy.run_expecting_error(train_graph_with(images=nan_images).prompt())
    assert "images: holds non-finite values (12288 NaN" in error


def test_aggregate_refuses_nan_scale(comfy):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library="finite_checks")
    model = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], tasks="all",
                      scale=math.nan, mode="elastic", weights="", uncond_weights="match cond")
    graph.add("PreviewAny", source=model[0])
    error = comfy.run_expecting_error(graph.prompt())
    assert "scale: must be a finite number" in error


def test_file_symlink_out_of_the_input_folder_is_refused(comfy, tmp_path):
    draw_concept(tmp_path, "secret", count=1)
    folder = comfy.workspace / "input" / "linked"
    folder.mkdir()
    draw_concept(folder, "dog", count=1)
    (folder / "01.png").symlink_to(tmp_path / "00.png")
    error = comfy.run_expecting_error(train_graph("linked_lib", "dog", "linked").prompt())
    assert "folder: 01.png links to" in error and "outside" in error
    assert not library_root(comfy, "linked_lib").exists()


def test_captions_written_by_windows_tools_train(comfy):
    folder = comfy.workspace / "input" / "windows_captions"
    folder.mkdir()
    draw_concept(folder, "dog", count=2)
    (folder / "00.txt").write_bytes(b"my dog\x92s favourite spot")  # Windows-1252 curly apostrophe
    (folder / "01.txt").write_bytes(b"\xef\xbb\xbfa dog on a plain background\r\n")  # UTF-8 with a BOM
    comfy.run(train_graph("windows_lib", "dog", "windows_captions", steps=1).prompt())
    assert (library_root(comfy, "windows_lib") / "manifest.json").is_file()
