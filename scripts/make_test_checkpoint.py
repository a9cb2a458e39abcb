"""Writes a random-weight checkpoint in the LDM key layout that ComfyUI's CheckpointLoaderSimple detects as SD15 or
SDXL. Run with the ComfyUI tree on PYTHONPATH (it builds the UNet and VAE from ComfyUI's own modules).

Layouts:
  mini         one UNet level: 4 cross-attention layers; the fastest for tests.
  sd15-blocks  SD1.5's full block structure (16 cross-attention layers) with every level at 320 channels,
               because detection reads the channel multipliers from the keys and does not constrain them.
  full         the real SD1.5 UNet (859.5M parameters), for benchmarks.
  mini-sd2     the mini UNet with SD2's 1024-wide context and linear projections, written alone (no VAE, no
               text encoder) for UNETLoader: a model that is *not* SD1.5-layout, for the refusal tests.
  sdxl-blocks  SDXL's block structure (70 cross-attention layers, 2048-wide context, 2816-wide ADM input) with
               every level at 320 channels: 283M UNet parameters, detected as SDXL, because `SDXL.unet_config`
               does not pin channel_mult (ComfyUI v0.3.75 comfy/supported_models.py:184-191).
  sdxl-full    the real SDXL UNet (2567M parameters; comfy/model_detection.py:871-874), for the slow tier.
The SD1.5 layouts carry the full-size text encoder (CLIP ViT-L). The SDXL layouts carry CLIP-L and CLIP-G towers of
SDXL_TEXT_LAYERS layers each, which the stock loader cannot build (it reads 12 and 32 layers from fixed json
configs): load them with a loader that passes te_model_options {"clip_l_model_config": {"num_hidden_layers": 3},
"clip_g_model_config": {"num_hidden_layers": 3}} (comfy/sd1_clip.py:105-107), such as the test node
CIDMTest_SmallTowerCheckpointLoader. The VAE (the SD VAE, which SDXL shares) is always full size.
"""

import argparse
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

SD15_ATTENTION = dict(context_dim=768, use_linear_in_transformer=False, num_heads=8, num_head_channels=-1)
SD2_ATTENTION = dict(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
SD15_BLOCKS = dict(num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
MINI_BLOCKS = dict(channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1])
# SDXL's conditioning and depths (comfy/supported_models.py:184-191, comfy/model_detection.py:871-874).
SDXL_ATTENTION = dict(context_dim=2048, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64,
                      num_classes="sequential", adm_in_channels=2816)
SDXL_BLOCKS = dict(num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                   transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
UNET_LAYOUTS = {  # everything UNetModel takes beyond the fixed model_channels 320 and 4 latent channels
    "mini": dict(**MINI_BLOCKS, **SD15_ATTENTION),
    "sd15-blocks": dict(channel_mult=[1, 1, 1, 1], **SD15_BLOCKS, **SD15_ATTENTION),
    "full": dict(channel_mult=[1, 2, 4, 4], **SD15_BLOCKS, **SD15_ATTENTION),
    "mini-sd2": dict(**MINI_BLOCKS, **SD2_ATTENTION),
    "sdxl-blocks": dict(channel_mult=[1, 1, 1], **SDXL_BLOCKS, **SDXL_ATTENTION),
    "sdxl-full": dict(channel_mult=[1, 2, 4], **SDXL_BLOCKS, **SDXL_ATTENTION),
}
UNET_ONLY = {"mini-sd2"}
SDXL_LAYOUTS = {"sdxl-blocks", "sdxl-full"}
SDXL_TEXT_LAYERS = 3  # the fewest the towers take: layer_idx=-2 asserts abs(layer_idx) < layers (sd1_clip.py:151-153)


def random_fill(state_dict, generator):
    """ComfyUI's ops skip weight init, so every tensor is filled explicitly with a fan-in scaled normal."""
    filled = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            filled[key] = value.clone()
        elif key.endswith("bias"):
            filled[key] = torch.zeros(value.shape)
        elif value.ndim == 1:
            filled[key] = torch.ones(value.shape)
        else:
            filled[key] = torch.randn(value.shape, generator=generator) / max(1, value[0].numel()) ** 0.5
    return filled


def clip_text_tower(generator, prefix, hidden=768, layers=12, ff=3072, projection=False, vocab=49408, positions=77):
    """A CLIP text transformer in HF names under `prefix` (`<prefix>text_model.*`; with `projection`, also
    `<prefix>text_projection.weight` [hidden, hidden], the pooled output's projection, comfy/clip_model.py:139-156).
    Defaults: CLIP ViT-L/14; CLIP-G (OpenCLIP bigG) is hidden 1280, ff 5120 (comfy/clip_config_bigg.json)."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    text_model = prefix + "text_model."
    tower = {text_model + "embeddings.token_embedding.weight": normal(vocab, hidden),
             text_model + "embeddings.position_embedding.weight": normal(positions, hidden) * 0.5,
             text_model + "final_layer_norm.weight": torch.ones(hidden),
             text_model + "final_layer_norm.bias": torch.zeros(hidden)}
    for i in range(layers):
        layer = f"{text_model}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tower[layer + f"self_attn.{proj}.weight"] = normal(hidden, hidden)
            tower[layer + f"self_attn.{proj}.bias"] = torch.zeros(hidden)
        for norm in ("layer_norm1", "layer_norm2"):
            tower[layer + norm + ".weight"] = torch.ones(hidden)
            tower[layer + norm + ".bias"] = torch.zeros(hidden)
        tower[layer + "mlp.fc1.weight"] = normal(ff, hidden)
        tower[layer + "mlp.fc1.bias"] = torch.zeros(ff)
        tower[layer + "mlp.fc2.weight"] = normal(hidden, ff)
        tower[layer + "mlp.fc2.bias"] = torch.zeros(hidden)
    if projection:
        tower[prefix + "text_projection.weight"] = normal(hidden, hidden)
    return tower


def text_towers(layout: str, generator):
    """SD1.5: CLIP ViT-L under `cond_stage_model.transformer.` (comfy/supported_models_base.py:45). SDXL: CLIP-L under
    `conditioner.embedders.0.transformer.` and CLIP-G, with its text_projection for the pooled output [B, 1280],
    under `conditioner.embedders.1.model.transformer.`, both SDXL_TEXT_LAYERS deep; the loader renames them to
    clip_l.* and clip_g.* (comfy/supported_models.py:223-233). CLIP-L's projection would be dropped there (SDXL
    uses CLIP-G's pooled output only, comfy/sdxl_clip.py:56-62), so it is not written."""
    if layout not in SDXL_LAYOUTS:
        return clip_text_tower(generator, "cond_stage_model.transformer.")
    towers = clip_text_tower(generator, "conditioner.embedders.0.transformer.", layers=SDXL_TEXT_LAYERS)
    towers.update(clip_text_tower(generator, "conditioner.embedders.1.model.transformer.", hidden=1280,
                                  layers=SDXL_TEXT_LAYERS, ff=5120, projection=True))
    return towers


def build_checkpoint(layout: str, seed: int):
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # must precede comfy.model_management's import on a CPU-only torch
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(seed)
    # On the meta device: random_fill reads only shapes, and the 2.6B sdxl-full UNet needs no second copy.
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4,
                     use_spatial_transformer=True, legacy=False, operations=comfy.ops.disable_weight_init,
                     device="meta", dtype=torch.float32, **UNET_LAYOUTS[layout])
    if layout in UNET_ONLY:  # UNETLoader takes the bare LDM UNet keys
        return random_fill(unet.state_dict(), generator)
    vae = AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                  "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                  "attn_resolutions": [], "dropout": 0.0}, embed_dim=4)
    checkpoint = {"model.diffusion_model." + k: v for k, v in random_fill(unet.state_dict(), generator).items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in random_fill(vae.state_dict(), generator).items()})
    checkpoint.update(text_towers(layout, generator))
    return checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", choices=sorted(UNET_LAYOUTS), default="mini")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    checkpoint = build_checkpoint(args.layout, args.seed)
    for key, value in checkpoint.items():  # one tensor at a time: sdxl-full is 10 GB in fp32
        checkpoint[key] = value.to(dtype).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # A cache hit must never see a half-written file, and two test runs filling the cache at once must not share a
    # temp file: a unique one next to the target, renamed over it.
    handle, partial = tempfile.mkstemp(prefix=os.path.basename(args.out) + ".", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(args.out)))
    os.close(handle)
    try:
        save_file(checkpoint, partial, metadata={"cidm.test_checkpoint": args.layout})
        os.replace(partial, args.out)
    except BaseException:
        os.unlink(partial)
        raise
    unet_params = sum(v.numel() for k, v in checkpoint.items()
                      if not k.startswith(("first_stage_model.", "cond_stage_model.", "conditioner.")))
    print(f"wrote {args.out}: {args.layout}, unet {unet_params / 1e6:.1f}M params, "
          f"{os.path.getsize(args.out) / 2**20:.0f} MiB, {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
