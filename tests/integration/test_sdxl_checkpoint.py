"""The generated SDXL test checkpoint in the real server (issue 30, item 9): ComfyUI v0.3.75's own detection makes
it an SDXL model with all 70 cross-attention layers, its 3-layer text towers give SDXL conditioning through the
stock CLIPTextEncode, and the stock KSampler samples it at a size that is, and one that is not, a multiple of 64.
"""

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from comfy_host import Graph

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sdxl_checkpoint, unet_millions",
                         [("sdxl-blocks", 283), pytest.param("sdxl-full", 2567, marks=pytest.mark.slow)],
                         indirect=["sdxl_checkpoint"])
def test_detected_as_sdxl_with_its_conditioning(comfy, sdxl_checkpoint, unet_millions):
    log_start = len(comfy.log())
    graph = Graph()
    checkpoint = graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=sdxl_checkpoint)
    cond = graph.add("CLIPTextEncode", text="a photo of a dog", clip=checkpoint[1])
    describe = graph.add("CIDMTest_Describe", model=checkpoint[0], conditioning=cond[0])
    outputs = comfy.run(graph.prompt())["outputs"][describe.id]

    model = outputs["model"][0]
    assert (model["model_class"], model["config_class"], model["model_type"]) == ("SDXL", "SDXL", "EPS")
    assert model["attn2"] == 70  # sdxl-facts §2: 2 + 2 + 10 + 10 + 10 + 30 + 6
    assert round(model["unet_params"] / 1e6) == unet_millions
    # [l (768) | g (1280)] on the last axis, and CLIP-G's projected pooled output (comfy/sdxl_clip.py:56-62)
    assert outputs["conditioning"] == [{"cond": [1, 77, 2048], "pooled_output": [1, 1280]}]
    assert "clip missing" not in comfy.log()[log_start:]  # every tower weight came from the file


@pytest.mark.parametrize("width, height", [(64, 64), (72, 104)])
def test_stock_ksampler_samples_it(comfy, sdxl_checkpoint, width, height):
    graph = Graph()
    checkpoint = graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=sdxl_checkpoint)
    positive = graph.add("CLIPTextEncode", text="a photo of a dog", clip=checkpoint[1])
    negative = graph.add("CLIPTextEncode", text="", clip=checkpoint[1])
    latent = graph.add("EmptyLatentImage", width=width, height=height, batch_size=1)
    sampled = graph.add("KSampler", model=checkpoint[0], seed=1, steps=2, cfg=5.0, sampler_name="euler",
                        scheduler="normal", positive=positive[0], negative=negative[0], latent_image=latent[0],
                        denoise=1.0)
    save = graph.add("SaveLatent", samples=sampled[0], filename_prefix=f"sdxl_{width}x{height}")
    decoded = graph.add("VAEDecode", samples=sampled[0], vae=checkpoint[2])
    graph.add("SaveImage", images=decoded[0], filename_prefix=f"sdxl_{width}x{height}")
    entry = comfy.run(graph.prompt())

    item = entry["outputs"][save.id]["latents"][0]
    samples = load_file(str(comfy.workspace / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]
    assert samples.shape == (1, 4, height // 8, width // 8)
    assert np.isfinite(samples).all() and samples.std() > 0
    image, = comfy.output_files(entry)
    assert Image.open(image).size == (width, height)  # the SD VAE under first_stage_model.* decodes it
