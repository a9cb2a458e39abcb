"""Export Concept LoRA in the real server: the file uses kohya SD1.x names (diffusers module paths), ComfyUI's
stock LoraLoader loads every key of it, and sampling with it gives the pack's own result (issue 16, kind 9).

The diffusers half (the same names into a diffusers UNet) is tests/unit/test_export.py.
"""

import pytest
from safetensors.torch import load_file

from comfy_host import Graph
from pack_workflows import library_root
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

CKPT = "cidm_sd15_blocks.safetensors"  # SD1.5's full block structure: 16 attn2 layers in 4 levels


def sampled_latent(graph, model, positive, negative, prefix):
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = graph.add("KSampler", model=model, seed=3, steps=3, cfg=5.0, sampler_name="euler",
                        scheduler="normal", positive=positive, negative=negative, latent_image=latent[0],
                        denoise=1.0)
    graph.add("SaveLatent", samples=sampled[0], filename_prefix=prefix)


def test_exported_lora_matches_the_pack_in_comfyui(comfy):
    synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, library_root(comfy, "export16"), ["dog"])
    export = Graph()
    lib = export.add("CIDM_LoadConceptLibrary", library="export16")
    export.add("CIDM_ExportConceptLoRA", library=lib[0], concept="dog", filename="dog16")
    comfy.run(export.prompt())
    lora_file = comfy.workspace / "models" / "loras" / "dog16.safetensors"
    names = {key.split(".")[0] for key in load_file(str(lora_file))}
    assert len(names) == 16 * 4
    assert all(name.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_attentions_0_",
                                "lora_unet_up_blocks_")) for name in names), sorted(names)[:3]

    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    positive = graph.add("CLIPTextEncode", text="a photo of a dog", clip=checkpoint[1])[0]
    negative = graph.add("CLIPTextEncode", text="", clip=checkpoint[1])[0]
    lib = graph.add("CIDM_LoadConceptLibrary", library="export16")
    in_pack = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], tasks="all", scale=1.0,
                        mode="fixed", weights="1", uncond_weights="match cond")
    stock = graph.add("LoraLoader", model=checkpoint[0], clip=checkpoint[1], lora_name=lora_file.name,
                      strength_model=1.0, strength_clip=1.0)
    for model, prefix in ((checkpoint[0], "base"), (in_pack[0], "pack"), (stock[0], "lora")):
        sampled_latent(graph, model, positive, negative, f"export16_{prefix}")
    comfy.run(graph.prompt())
    latents = {prefix: load_file(str(next((comfy.workspace / "output").glob(f"export16_{prefix}_*.latent"))))
               ["latent_tensor"] for prefix in ("base", "pack", "lora")}

    effect = (latents["pack"] - latents["base"]).abs()
    mismatch = (latents["lora"] - latents["pack"]).abs()
    assert effect.mean() > 0.01, "the synthetic LoRA should change the sample"
    assert mismatch.max() < 1e-3 * effect.max()  # measured: 1.0e-3 against 41, (float(mismatch.max()), float(effect.max()))
    assert "lora key not loaded" not in comfy.log()
