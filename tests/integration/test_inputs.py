"""Bad node inputs in the real server: each gives an error that names the input, before any work is done."""

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_host import Graph, draw_concept, ensure_checkpoint
from pack_workflows import CKPT, add_trainer, library_root, train_graph

pytestmark = pytest.mark.integration


def train_graph_with(images=None, **options):
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library="finite_checks")
    add_trainer(graph, checkpoint, lib[0], "dog", images=None if images is None else images(graph), **options)
    return graph


@pytest.mark.parametrize("name", ["multiplier", "lora_lr", "orthogonal_weight", "clora_lambda"])
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


def write_unet_variant(target, key: str, dim: int, channels: int) -> None:
    """The mini checkpoint's UNet alone, with `key` (and its bias) widened to `channels` along `dim`."""
    unet = {}
    with safe_open(str(ensure_checkpoint("mini")), "pt") as f:
        for name in f.keys():
            if name.startswith("model.diffusion_model."):
                unet[name[len("model.diffusion_model."):]] = f.get_tensor(name)
    for name in (key, key.replace(".weight", ".bias")):
        shape = list(unet[name].shape)
        if len(shape) > dim:
            shape[dim] = channels
            unet[name] = torch.randn(shape) * 0.01
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(unet, str(target))


@pytest.mark.parametrize("key,dim,channels,expected", [
    ("input_blocks.0.0.weight", 1, 9, "this UNet takes 9 input channels (an inpainting UNet"),
    ("out.2.weight", 0, 8, "this UNet predicts 8 channels, not the 4 of its latent"),
])
def test_train_refuses_unets_it_cannot_train(comfy, key, dim, channels, expected):
    name = f"cidm_mini_{channels}ch.safetensors"
    write_unet_variant(comfy.workspace / "models" / "diffusion_models" / name, key, dim, channels)
    folder = comfy.workspace / "input" / f"unet_{channels}"
    folder.mkdir()
    draw_concept(folder, "dog", count=1)
    graph = train_graph(f"unet_{channels}_lib", "dog", f"unet_{channels}")
    trainer = next(spec for spec in graph.nodes.values() if spec["class_type"] == "CIDM_TrainConceptIncrement")
    trainer["inputs"]["model"] = graph.add("UNETLoader", unet_name=name, weight_dtype="default")[0].link
    error = comfy.run_expecting_error(graph.prompt())
    assert f"model: {expected}" in error and "train on the plain SD1.5 checkpoint" in error, error
    assert not library_root(comfy, f"unet_{channels}_lib").exists()
