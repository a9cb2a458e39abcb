"""The exported LoRA file loads into a diffusers UNet and gives the pack's own result (issue 16, kind 9), with
SD1.x names for SD1.5 and kohya SDXL names for SDXL (issue 30, item 6).

The real-server half (ComfyUI's LoraLoader on the same kind of file) is tests/integration/test_export_loads.py.
"""

import logging
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import save_file

from cidm.adapters import LayerLoRABank
from cidm.aggregation import ConstantRouter
from cidm.backends.diffusers_backend import DiffusersDenoiser
from cidm.errors import CIDMInputError
from cidm.export import (diffusers_unet_path, export_metadata, lora_unet_path, standard_lora_state_dict,
                         write_export)
from cidm.family import SD15, SDXL
from cidm.layers import PROJECTIONS, cross_attention_layers
from cidm.library import TaskRecord

# SD1.5's 16 attn2 modules under their LDM names, as ComfyUI's UNet (comfy/ldm/.../openaimodel.py) names them:
# attention in input blocks 1, 2, 4, 5, 7, 8, the middle block, and output blocks 3..11.
SD15_LDM_ATTN2 = ([f"input_blocks.{b}.1.transformer_blocks.0.attn2" for b in (1, 2, 4, 5, 7, 8)]
                  + ["middle_block.1.transformer_blocks.0.attn2"]
                  + [f"output_blocks.{b}.1.transformer_blocks.0.attn2" for b in range(3, 12)])
# SDXL's 70, in CIDM order (shared/reference/sdxl-facts.md §2): no attention at level 0; depth 2 at input blocks
# 4, 5 and output blocks 3..5, depth 10 at input blocks 7, 8, the middle block and output blocks 0..2.
_SDXL_DEPTHS = ([("input_blocks.4", 2), ("input_blocks.5", 2), ("input_blocks.7", 10), ("input_blocks.8", 10),
                 ("middle_block", 10)] + [(f"output_blocks.{b}", 10) for b in (0, 1, 2)]
                + [(f"output_blocks.{b}", 2) for b in (3, 4, 5)])
SDXL_LDM_ATTN2 = [f"{block}.1.transformer_blocks.{i}.attn2" for block, depth in _SDXL_DEPTHS for i in range(depth)]
CONTEXT = 24


def sd15_structured_unet() -> UNet2DConditionModel:
    """SD1.5's block structure (4 levels, 2 residual blocks each, attention on the first 3) at tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(16, 16, 16, 16),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=CONTEXT, attention_head_dim=4, norm_num_groups=8
                                ).eval().requires_grad_(False)


def sdxl_structured_unet() -> UNet2DConditionModel:
    """SDXL's block structure at tiny widths: diffusers' SDXL config (stabilityai/stable-diffusion-xl-base-1.0
    unet/config.json: 3 levels, 2 residual blocks each, no attention at level 0, transformer depths 2 and 10,
    linear projections, text_time ADM) with 16 channels and a 24-wide context, 0.55 M parameters."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(16, 16, 16),
                                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=CONTEXT,
                                attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=16 + 6 * 8).eval().requires_grad_(False)


def sd15_lora_state_dict(path, unet):
    """What diffusers' SD1.x pipeline does with a LoRA file before `load_lora_into_unet`."""
    return StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))


def sdxl_lora_state_dict(path, unet):
    """What diffusers' SDXL `load_lora_weights` does with a LoRA file before `load_lora_into_unet`
    (diffusers v0.42.1 loaders/lora_pipeline.py, StableDiffusionXLLoraLoaderMixin.load_lora_weights)."""
    return StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path), unet_config=unet.config)


def sdxl_conditioning(generator, batch):
    """The extra inputs of diffusers' text_time ADM: pooled text [B, 16] and the 6 size ids [B, 6]."""
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 16, generator=generator),
                                  "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}}


FAMILY_CASES = {SD15.name: (SD15, sd15_structured_unet, SD15_LDM_ATTN2, sd15_lora_state_dict, lambda g, b: {}),
                SDXL.name: (SDXL, sdxl_structured_unet, SDXL_LDM_ATTN2, sdxl_lora_state_dict, sdxl_conditioning)}


def random_task(unet, rank=4, std=0.5):
    generator = torch.Generator().manual_seed(1)
    lora = {}
    for layer in cross_attention_layers(unet):
        for proj, (out_features, in_features) in layer.projection_shapes().items():
            lora[(layer.index, proj)] = (torch.randn(rank, in_features, generator=generator) * std,
                                         torch.randn(out_features, rank, generator=generator) * std)
    return lora


def test_ldm_paths_map_to_the_diffusers_modules():
    unet = sd15_structured_unet()
    diffusers_paths = [layer.path for layer in cross_attention_layers(unet)]
    assert [diffusers_unet_path(p) for p in SD15_LDM_ATTN2] == diffusers_paths
    assert [diffusers_unet_path(p) for p in diffusers_paths] == diffusers_paths
    for path in ("input_blocks.3.1.transformer_blocks.0.attn2", "input_blocks.0.1.attn2", "out.2", "attn2"):
        with pytest.raises(CIDMInputError, match="library: layer"):
            diffusers_unet_path(path)


def test_sdxl_exports_use_the_kohya_sdxl_names():
    """kohya-ss sd-scripts' SDXL names are the LDM module paths (sdxl_original_unet.py), which ComfyUI maps
    directly (comfy/lora.py:179-183); SD1.5 keeps the diffusers paths."""
    lora = {(layer, "to_q"): (torch.ones(1, 4), torch.ones(4, 1)) for layer in range(len(SDXL_LDM_ATTN2))}
    state = standard_lora_state_dict(lora, SDXL_LDM_ATTN2, 1.0, SDXL)
    names = {key.removesuffix(".lora_down.weight") for key in state if key.endswith(".lora_down.weight")}
    assert names == {"lora_unet_" + f"{path}.to_q".replace(".", "_") for path in SDXL_LDM_ATTN2}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in names
    assert lora_unet_path(SD15_LDM_ATTN2[0], SD15) == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    for path in ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "input_blocks.4.0.attn2", "attn2"):
        with pytest.raises(CIDMInputError, match="library: layer .* not an SDXL UNet attention module in LDM form"):
            lora_unet_path(path, SDXL)


# SDXL in fp16 only, the dtype exports are written in: its case is the slowest here (70 layers)
@pytest.mark.parametrize("family,dtype", [(SD15.name, torch.float32), (SD15.name, torch.float16),
                                          (SDXL.name, torch.float16)], ids=["SD1.5-fp32", "SD1.5-fp16", "SDXL-fp16"])
@torch.no_grad()
def test_export_loads_into_diffusers_and_matches_the_pack(tmp_path, caplog, family, dtype):
    family, make_unet, ldm_paths, lora_state_dict, conditioning = FAMILY_CASES[family]
    unet = make_unet()
    assert len(cross_attention_layers(unet)) == len(ldm_paths)
    # The pack runs the factors as the file stores them: through SDXL's 70 layers, fp16 rounding of these large
    # random factors alone moves the output by 12% of the LoRA's effect, which is not what this test is about.
    lora = {key: tuple(factor.to(dtype).float() for factor in factors) for key, factors in random_task(unet).items()}
    multiplier = 0.7
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, CONTEXT, generator=generator)
    timestep = torch.tensor([10, 500])
    extra = conditioning(generator, 2)
    base = unet(x, timestep, encoder_hidden_states=context, **extra).sample

    denoiser = DiffusersDenoiser(unet, scheduler=type("Scheduler", (), {"config": type(
        "Config", (), {"prediction_type": "epsilon"})})())
    banks = {layer.index: LayerLoRABank([{p: lora[(layer.index, p)] for p in PROJECTIONS}], multiplier)
             for layer in denoiser.layers}
    with denoiser.adapted(banks, ConstantRouter([1.0])):
        in_pack = unet(x, timestep, encoder_hidden_states=context, **extra).sample

    path = tmp_path / "concept.safetensors"
    save_file(standard_lora_state_dict(lora, ldm_paths, multiplier, family, dtype=dtype), str(path))
    with caplog.at_level(logging.WARNING):
        state, alphas = lora_state_dict(path, unet)
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=unet, adapter_name="concept")
    assert not [r for r in caplog.records if r.name.startswith(("diffusers", "peft"))], caplog.text
    adapted = {name.removesuffix(".lora_A.concept") for name, _ in unet.named_modules()
               if name.endswith(".lora_A.concept")}
    assert adapted == {f"{layer.path}.{proj}" for layer in cross_attention_layers(unet) for proj in PROJECTIONS}
    for layer in cross_attention_layers(unet):  # each projection gets the pack's delta m·BA, at its own layer
        for proj in PROJECTIONS:
            down, up = lora[(layer.index, proj)]
            delta = unet.get_submodule(f"{layer.path}.{proj}").get_delta_weight("concept")
            torch.testing.assert_close(delta, multiplier * up @ down, rtol=1e-5, atol=1e-5)
    loaded = unet(x, timestep, encoder_hidden_states=context, **extra).sample

    effect = (in_pack - base).abs()
    assert effect.mean() > 0.05  # the LoRA changes the output, so a LoRA that is dropped cannot pass
    assert (loaded - in_pack).abs().max() < 1e-3 * effect.max()  # measured on SDXL: 2e-4 against 0.53


# An export never overwrites a file the pack did not write for the same task (issue 29, kind 2) ------------------


def task_record(concept="dog", sha256="a" * 64, index=1) -> TaskRecord:
    return TaskRecord(index=index, concept=concept, tokens=[f"<{concept}1>"], method="cidm", rank=1, multiplier=1.0,
                      steps=1, seed=0, hyperparameters={}, file=f"task_{index:03d}_{concept}.safetensors",
                      sha256=sha256, created="2024-01-01T00:00:00+00:00")


STATE = {"lora_unet_mid_block_attentions_0_attn2_to_q.lora_down.weight": torch.ones(1, 4)}


def test_export_writes_atomically_with_the_folders_permissions_and_its_identity(tmp_path):
    previous = os.umask(0o022)
    try:
        assert write_export(tmp_path / "dog.safetensors", STATE, "pets", task_record()) is False
    finally:
        os.umask(previous)
    path = tmp_path / "dog.safetensors"
    assert path.stat().st_mode & 0o777 == 0o644  # readable by everything sharing models/loras, not 0600
    assert [p.name for p in tmp_path.iterdir()] == ["dog.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as reader:
        assert reader.metadata() == export_metadata("pets", task_record())


@pytest.mark.parametrize("existing,described", [
    (b"the user's own LoRA", "not a LoRA this pack exported"),
    (("pets", task_record("cat")), "this pack's export of 'cat' from library 'pets'"),
    (("other", task_record()), "this pack's export of 'dog' from library 'other'"),
    (("pets", task_record(sha256="b" * 64)), "another version of 'dog'"),
])
def test_export_refuses_any_other_existing_file(tmp_path, existing, described):
    path = tmp_path / "dog.safetensors"
    if isinstance(existing, bytes):
        path.write_bytes(existing)
    else:
        write_export(path, STATE, *existing)
    before = path.read_bytes()
    with pytest.raises(CIDMInputError, match="^filename: ") as caught:
        write_export(path, {key: value * 2 for key, value in STATE.items()}, "pets", task_record())
    message = str(caught.value)
    assert str(path) in message and described in message and "never overwritten" in message, message
    assert "new name" in message and "move or delete" in message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dog.safetensors"]


def test_export_refuses_a_symlink_and_a_folder(tmp_path):
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "missing")  # a dangling link is still the user's
    (tmp_path / "folder.safetensors").mkdir()
    for name in ("link.safetensors", "folder.safetensors"):
        with pytest.raises(CIDMInputError, match="filename: .* already exists"):
            write_export(tmp_path / name, STATE, "pets", task_record())


def test_export_replaces_its_own_export_of_the_same_task(tmp_path):
    path = tmp_path / "dog.safetensors"
    write_export(path, STATE, "pets", task_record())
    assert write_export(path, {key: value * 2 for key, value in STATE.items()}, "pets", task_record()) is True
    with safe_open(str(path), framework="pt") as reader:
        assert reader.get_tensor(next(iter(STATE))).sum() == 8
