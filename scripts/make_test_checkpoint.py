"""Writes a random-weight checkpoint in the SD1.5 (LDM) key layout that ComfyUI's CheckpointLoaderSimple detects
as SD15. Run with the ComfyUI tree on PYTHONPATH (it builds the UNet and VAE from ComfyUI's own modules).

Layouts:
  mini         one UNet level: 4 cross-attention layers; the fastest for tests.
  sd15-blocks  SD1.5's full block structure (16 cross-attention layers) with every level at 320 channels,
               because detection reads the channel multipliers from the keys and does not constrain them.
  full         the real SD1.5 UNet (859.5M parameters), for benchmarks.
  mini-sd2     the mini UNet with SD2's 1024-wide context and linear projections, written alone (no VAE, no
               text encoder) for UNETLoader: a model that is *not* SD1.5-layout, for the refusal tests.
The text encoder (CLIP ViT-L) and VAE are always full size: ComfyUI builds both from fixed configs.
"""

import argparse
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

UNET_LAYOUTS = {
    "mini": dict(channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1]),
    "sd15-blocks": dict(channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
                        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "full": dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
}
SD15_ATTENTION = dict(context_dim=768, use_linear_in_transformer=False, num_heads=8, num_head_channels=-1)
SD2_ATTENTION = dict(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
UNET_LAYOUTS["mini-sd2"] = UNET_LAYOUTS["mini"]
UNET_ONLY = {"mini-sd2"}
CLIP_PREFIX = "cond_stage_model.transformer.text_model."


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


def clip_text_tower(generator, hidden=768, layers=12, vocab=49408, positions=77, ff=3072):
    """CLIP ViT-L/14 text tower under SD1.5's checkpoint key names."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    tower = {CLIP_PREFIX + "embeddings.token_embedding.weight": normal(vocab, hidden),
             CLIP_PREFIX + "embeddings.position_embedding.weight": normal(positions, hidden) * 0.5,
             CLIP_PREFIX + "final_layer_norm.weight": torch.ones(hidden),
             CLIP_PREFIX + "final_layer_norm.bias": torch.zeros(hidden)}
    for i in range(layers):
        layer = f"{CLIP_PREFIX}encoder.layers.{i}."
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
    return tower


def build_checkpoint(layout: str, seed: int):
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # must precede comfy.model_management's import on a CPU-only torch
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(seed)
    attention = SD2_ATTENTION if layout in UNET_ONLY else SD15_ATTENTION
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4,
                     use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                     operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32,
                     **attention, **UNET_LAYOUTS[layout])
    if layout in UNET_ONLY:  # UNETLoader takes the bare LDM UNet keys
        return random_fill(unet.state_dict(), generator)
    vae = AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                  "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                  "attn_resolutions": [], "dropout": 0.0}, embed_dim=4)
    checkpoint = {"model.diffusion_model." + k: v for k, v in random_fill(unet.state_dict(), generator).items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in random_fill(vae.state_dict(), generator).items()})
    checkpoint.update(clip_text_tower(generator))
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
    checkpoint = {k: v.to(dtype).contiguous() for k, v in build_checkpoint(args.layout, args.seed).items()}
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
                      if not k.startswith(("first_stage_model.", "cond_stage_model.")))
    print(f"wrote {args.out}: {args.layout}, unet {unet_params / 1e6:.1f}M params, "
          f"{os.path.getsize(args.out) / 2**20:.0f} MiB, {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
