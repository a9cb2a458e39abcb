"""Test-only ComfyUI nodes, linked into the test server's custom_nodes (never shipped with the pack).

- CIDMTest_CountUNetCalls logs every UNet call of a model (batch, cond_or_uncond, context length, latent size)
  under a tag.
- CIDMTest_Attn2Replace sets an attn2 replace patch on every cross-attention block, as IPAdapter does with
  `set_model_attn2_replace`; the patch is plain attention over the projected q/k/v, so it alone changes nothing.
- CIDMTest_SaveLatent writes a LATENT's samples to output/<tag>.safetensors for exact comparisons.
- CIDMTest_SmallTowerCheckpointLoader is CheckpointLoaderSimple for checkpoints whose text towers have
  TEXT_LAYERS layers (the SDXL layouts of scripts/make_test_checkpoint.py), which the stock loader would build at
  full depth (12 and 32 layers) and leave mostly uninitialised.
- CIDMTest_Describe reports what a MODEL and a CONDITIONING are, in the prompt's /history outputs.
- CIDMTest_SmallClipVision is a CLIP_VISION of random weights made at test time: ComfyUI's own ClipVisionModel
  (comfy/clip_vision.py) on a 2-layer, 64-wide config of the ViT-L one's kind, with a chosen projection width.
"""

import json
import logging
import os
import tempfile

import torch

import folder_paths
from safetensors.torch import save_file

import comfy.clip_vision
import comfy.sd
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

TEXT_LAYERS = 3  # scripts/make_test_checkpoint.py SDXL_TEXT_LAYERS


class CountUNetCalls:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "count"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"

    def patch(self, model, tag):
        patched = model.clone()

        def counted(apply_model, args):
            context = args["c"].get("c_crossattn")
            logging.info("CIDM-TEST-UNET %s batch=%d cond_or_uncond=%s tokens=%d shape=%s", tag,
                         args["input"].shape[0], list(args["cond_or_uncond"]),
                         -1 if context is None else context.shape[1], "x".join(str(n) for n in args["input"].shape[2:]))
            return apply_model(args["input"], args["timestep"], **args["c"])

        patched.set_model_unet_function_wrapper(counted)
        return (patched,)


class Attn2Replace:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"

    def patch(self, model):
        patched = model.clone()
        unet = patched.model.diffusion_model

        def attention(q, k, v, extra_options):
            return optimized_attention(q, k, v, extra_options["n_heads"])

        def has_transformer(block):
            return any(isinstance(layer, SpatialTransformer) for layer in block)

        for index, block in enumerate(unet.input_blocks):
            if has_transformer(block):
                patched.set_model_attn2_replace(attention, "input", index)
        if has_transformer(unet.middle_block):
            patched.set_model_attn2_replace(attention, "middle", 0)
        for index, block in enumerate(unet.output_blocks):
            if has_transformer(block):
                patched.set_model_attn2_replace(attention, "output", index)
        return (patched,)


class SaveLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "tag": ("STRING", {"default": "latent"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def save(self, samples, tag):
        save_file({"samples": samples["samples"].contiguous()},
                  os.path.join(folder_paths.get_output_directory(), f"{tag}.safetensors"))
        return {}


class SmallTowerCheckpointLoader:
    """CheckpointLoaderSimple (ComfyUI v0.3.75 nodes.py:576-579) with te_model_options that set the depth of both
    CLIP towers; SDClipModel merges `<name>_model_config` into its json config (comfy/sd1_clip.py:105-107), the
    names being clip_l and clip_g (comfy/sd1_clip.py:97, comfy/sdxl_clip.py:12)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, ckpt_name):
        depth = {"num_hidden_layers": TEXT_LAYERS}
        out = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", ckpt_name), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
            te_model_options={"clip_l_model_config": depth, "clip_g_model_config": depth})
        return out[:3]


class SmallClipVision:
    @classmethod
    def INPUT_TYPES(cls):
        # clip_name: CLIPVisionLoader's input, ignored, so that a shipped workflow's loader can be swapped for this
        return {"required": {"clip_name": ("STRING", {"default": ""})},
                "optional": {"seed": ("INT", {"default": 0, "min": 0}),
                             "projection_dim": ("INT", {"default": 768, "min": 8, "max": 4096})}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, clip_name, seed=0, projection_dim=768):
        config = {"hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 64, "intermediate_size": 128,
                  "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 4,
                  "num_channels": 3, "num_hidden_layers": 2, "patch_size": 16, "projection_dim": projection_dim}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "config.json")
            with open(path, "w") as handle:
                json.dump(config, handle)
            clip_vision = comfy.clip_vision.ClipVisionModel(path)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, tensor in clip_vision.model.state_dict().items():
                if "norm" in name and name.endswith("weight"):
                    tensor.fill_(1.0)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        return (clip_vision,)


class Describe:
    """UI output `model`: [{"model_class": the model_base class (e.g. "SDXL"), "config_class": the detected
    supported_models class, "model_type": e.g. "EPS", "attn2": the number of cross-attention modules,
    "unet_params": the UNet's parameter count}]; `conditioning`: one {"cond": [B, T, C], "pooled_output": [B, C]
    or None} per entry."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ()
    FUNCTION = "describe"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def describe(self, model=None, conditioning=None):
        ui = {}
        if model is not None:
            unet = model.model.diffusion_model
            ui["model"] = [{"model_class": type(model.model).__name__,
                            "config_class": type(model.model.model_config).__name__,
                            "model_type": model.model.model_type.name,
                            "attn2": sum(name.endswith(".attn2") for name, _ in unet.named_modules()),
                            "unet_params": sum(p.numel() for p in unet.parameters())}]
        if conditioning is not None:
            ui["conditioning"] = [{"cond": list(cond.shape),
                                   "pooled_output": None if extra.get("pooled_output") is None
                                   else list(extra["pooled_output"].shape)}
                                  for cond, extra in conditioning]
        return {"ui": ui}


NODE_CLASS_MAPPINGS = {"CIDMTest_CountUNetCalls": CountUNetCalls, "CIDMTest_Attn2Replace": Attn2Replace,
                       "CIDMTest_SaveLatent": SaveLatent,
                       "CIDMTest_SmallTowerCheckpointLoader": SmallTowerCheckpointLoader,
                       "CIDMTest_Describe": Describe, "CIDMTest_SmallClipVision": SmallClipVision}
