"""Test-only ComfyUI nodes, linked into the test server's custom_nodes (never shipped with the pack).

- CIDMTest_CountUNetCalls logs every UNet call of a model (batch, cond_or_uncond, context length, latent size)
  under a tag.
- CIDMTest_Attn2Replace sets an attn2 replace patch on every cross-attention block, as IPAdapter does with
  `set_model_attn2_replace`; the patch is plain attention over the projected q/k/v, so it alone changes nothing.
- CIDMTest_SaveLatent writes a LATENT's samples to output/<tag>.safetensors for exact comparisons.
"""

import logging
import os

import folder_paths
from safetensors.torch import save_file

from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention


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
                         args["input"].shape[0], list(args["cond_or_uncond"]), -1 if context is None else context.shape[1],
                         "x".join(str(n) for n in args["input"].shape[2:]))
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


NODE_CLASS_MAPPINGS = {"CIDMTest_CountUNetCalls": CountUNetCalls, "CIDMTest_Attn2Replace": Attn2Replace,
                       "CIDMTest_SaveLatent": SaveLatent}
