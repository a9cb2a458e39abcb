"""Export Concept LoRA in the real server: the file uses kohya SD1.x names (diffusers module paths) for SD1.5 and
kohya SDXL names (LDM module paths) for SDXL, ComfyUI's stock LoraLoader loads every key of it, and sampling with it
gives the pack's own result (issue 16, kind 9; issue 30, item 6).

The diffusers half (the same names into a diffusers UNet) is tests/unit/test_export.py.
"""

import pytest
from safetensors.torch import load_file

from cidm.layers import PROJECTIONS
from comfy_host import Graph
from pack_workflows import library_root
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

CKPT = "cidm_sd15_blocks.safetensors"  # SD1.5's full block structure: 16 attn2 layers in 4 levels


def sampled_latent(graph, model, positive, negative, prefix, steps=3):
    latent = graph.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = graph.add("KSampler", model=model, seed=3, steps=steps, cfg=5.0, sampler_name="euler",
                        scheduler="normal", positive=positive, negative=negative, latent_image=latent[0],
                        denoise=1.0)
    graph.add("SaveLatent", samples=sampled[0], filename_prefix=prefix)


def saved_latents(comfy, group, names):
    """The latents `sampled_latent` saved under the prefixes `<group>_<name>`, by name."""
    output = comfy.workspace / "output"
    return {name: load_file(str(next(output.glob(f"{group}_{name}_*.latent"))))["latent_tensor"] for name in names}


def export_lora(comfy, library, filename):
    """Runs Export Concept LoRA on the library's 'dog'; the written file's keys without their suffixes."""
    export = Graph()
    lib = export.add("CIDM_LoadConceptLibrary", library=library)
    export.add("CIDM_ExportConceptLoRA", library=lib[0], concept="dog", filename=filename)
    comfy.run(export.prompt())
    lora_file = comfy.workspace / "models" / "loras" / f"{filename}.safetensors"
    return lora_file, {key.split(".")[0] for key in load_file(str(lora_file))}


def test_exported_lora_matches_the_pack_in_comfyui(comfy):
    synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, library_root(comfy, "export16"), ["dog"])
    lora_file, names = export_lora(comfy, "export16", "dog16")
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
    latents = saved_latents(comfy, "export16", ("base", "pack", "lora"))

    effect = (latents["pack"] - latents["base"]).abs()
    mismatch = (latents["lora"] - latents["pack"]).abs()
    assert effect.mean() > 0.01, "the synthetic LoRA should change the sample"
    # measured: 1.0e-3 against 41
    assert mismatch.max() < 1e-3 * effect.max(), (float(mismatch.max()), float(effect.max()))
    assert "lora key not loaded" not in comfy.log()


def test_sdxl_export_loads_as_the_pack_applies_it_in_comfyui(comfy, sdxl_checkpoint):
    """On the SDXL layout (70 attn2 layers): the file holds kohya SDXL names, the stock LoraLoaderModelOnly loads
    all 280 of them and samples bit for bit as Load Concept as LoRA, and as the pack's own LoRA (Elastic Aggregate
    LoRAs, fixed weight 1)."""
    log_start = len(comfy.log())
    library = synthesize_library(comfy.workspace / "models" / "checkpoints" / sdxl_checkpoint,
                                 library_root(comfy, "exportxl"), ["dog"])
    lora_file, names = export_lora(comfy, "exportxl", "dogxl")
    assert names == {"lora_unet_" + f"{path}.{proj}".replace(".", "_")
                     for path in library.base_model["layer_paths"] for proj in PROJECTIONS}
    assert len(names) == 70 * 4 and "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in names

    graph = Graph()
    checkpoint = graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=sdxl_checkpoint)
    positive = graph.add("CLIPTextEncode", text="a photo of a dog", clip=checkpoint[1])[0]
    negative = graph.add("CLIPTextEncode", text="", clip=checkpoint[1])[0]
    lib = graph.add("CIDM_LoadConceptLibrary", library="exportxl")
    models = {"base": checkpoint[0],
              "concept": graph.add("CIDM_LoadConceptAsLoRA", model=checkpoint[0], library=lib[0], concept="dog",
                                   strength_model=1.0)[0],
              "lora": graph.add("LoraLoaderModelOnly", model=checkpoint[0], lora_name=lora_file.name,
                                strength_model=1.0)[0],
              "pack": graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], tasks="all",
                                scale=1.0, mode="fixed", weights="1", uncond_weights="match cond")[0]}
    for prefix, model in models.items():
        sampled_latent(graph, model, positive, negative, f"exportxl_{prefix}", steps=1)
    comfy.run(graph.prompt())
    latents = saved_latents(comfy, "exportxl", models)

    effect = (latents["concept"] - latents["base"]).abs()
    assert effect.mean() > 0.01, "the synthetic LoRA should change the sample"  # measured: mean 41, max 140
    assert latents["lora"].equal(latents["concept"])
    # measured: bit for bit too (at scale 1 both add B·A to the float32 weight once per run)
    assert latents["pack"].equal(latents["lora"]), float((latents["pack"] - latents["lora"]).abs().max())
    assert "lora key not loaded" not in comfy.log()[log_start:]
