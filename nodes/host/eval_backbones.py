"""The paper's evaluation backbones as CLIP_VISION values (issue 34): CLIP ViT-B/32 (vision and text towers) and DINO
ViT-S/16, which ComfyUI's CLIPVisionLoader cannot load (its detection knows ViT-L/H/bigG, SigLIP and DINOv2 only,
comfy/clip_vision.py:118-146).

- CLIP: ComfyUI's own config-driven ClipVisionModel and CLIPTextModel (comfy/clip_model.py) on a config read from
  the checkpoint's shapes, in the Hugging Face layout of `openai/clip-vit-base-patch32` (`vision_model.*`,
  `visual_projection`, `text_model.*`, `text_projection`). Text is tokenized by ComfyUI's CLIP tokenizer
  (comfy/sd1_tokenizer, OpenAI CLIP's BPE), as CIFC's `clip.tokenize(truncate=True)` does: start, text, end.
- DINO: cidm.vit.DinoViT.
Each value says which paper backbone it is (`paper_name`), so an evaluation can say whether it is comparable.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import comfy.clip_model
import comfy.clip_vision
import comfy.model_management
import comfy.ops
import comfy.sd1_clip
import torch

from ...cidm.errors import CIDMInputError
from ...cidm.vit import DinoViT, is_dino_vit

CLIP_HEAD_WIDTH = 64
CLIP_END_TOKEN = 49407
PAPER_CLIP = (768, 32, 12)  # ViT-B/32: width, patch, layers
PAPER_DINO = (384, 16, 12)  # ViT-S/16


def layer_count(state_dict: dict, prefix: str) -> int:
    return 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", key)))


def vision_config(state_dict: dict) -> dict:
    """ComfyUI's CLIP vision config (the keys of comfy/clip_vision_config_vitl.json) for these weights."""
    width = state_dict["vision_model.embeddings.class_embedding"].shape[0]
    patch = state_dict["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = state_dict["vision_model.embeddings.position_embedding.weight"].shape[0]
    return {"hidden_act": "quick_gelu", "hidden_size": width, "image_size": patch * round((positions - 1) ** 0.5),
            "intermediate_size": state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": width // CLIP_HEAD_WIDTH,
            "num_channels": 3, "num_hidden_layers": layer_count(state_dict, "vision_model.encoder.layers."),
            "patch_size": patch, "projection_dim": state_dict["visual_projection.weight"].shape[0]}


def text_config(state_dict: dict) -> dict:
    """ComfyUI's CLIP text config (comfy/clip_model.CLIPTextModel) for these weights."""
    vocab, width = state_dict["text_model.embeddings.token_embedding.weight"].shape
    return {"num_hidden_layers": layer_count(state_dict, "text_model.encoder.layers."), "hidden_size": width,
            "num_attention_heads": width // CLIP_HEAD_WIDTH, "hidden_act": "quick_gelu",
            "intermediate_size": state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "max_position_embeddings": state_dict["text_model.embeddings.position_embedding.weight"].shape[0],
            "eos_token_id": CLIP_END_TOKEN, "vocab_size": vocab}


class PaperCLIP(comfy.clip_vision.ClipVisionModel):
    """A CLIP checkpoint with both towers: a ClipVisionModel (so any CLIP_VISION consumer takes it) that also
    embeds text in the same space (`encode_text`).

    Raises:
        CIDMInputError: ("backbone") when a weight of either tower is missing.
    """

    def __init__(self, state_dict: dict):
        config = vision_config(state_dict)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "config.json")
            with open(path, "w") as handle:
                json.dump(config, handle)
            super().__init__(path)
        missing, _ = self.load_sd({k: v for k, v in state_dict.items()
                                   if k.startswith(("vision_model.", "visual_projection."))})
        self.text = None
        if "text_projection.weight" in state_dict:
            self.text = comfy.clip_model.CLIPTextModel(text_config(state_dict), torch.float32, "cpu",
                                                       comfy.ops.manual_cast)
            missing += self.text.load_state_dict({k: v.float() for k, v in state_dict.items()
                                                  if k.startswith(("text_model.", "text_projection."))},
                                                 strict=False).missing_keys
            self.text.eval()
            self.tokenizer = comfy.sd1_clip.SDTokenizer().tokenizer
        if missing:
            raise CIDMInputError("backbone", f"the CLIP checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
        shape = config["hidden_size"], config["patch_size"], config["num_hidden_layers"]
        self.paper_name = "CLIP ViT-B/32" if shape == PAPER_CLIP and self.text is not None else None

    def encode_text(self, texts: list[str]) -> torch.Tensor | None:
        """[N, D] projected text embeddings (None without a text tower): each text as start, its tokens (at most
        75) and end, padded with end tokens to the 77 positions; the embedding is taken at the first end token
        (causal attention: the padding does not reach it)."""
        if self.text is None:
            return None
        limit = self.text.text_model.embeddings.position_embedding.weight.shape[0]
        ids = [self.tokenizer(text, truncation=True, max_length=limit)["input_ids"] for text in texts]
        tokens = torch.tensor([row + [CLIP_END_TOKEN] * (limit - len(row)) for row in ids])  # the model takes 77
        with torch.no_grad():
            return self.text(tokens)[2].float()


class PaperDINO:
    """DINO ViT as a CLIP_VISION value: `encode_image(image, crop)` gives `image_embeds` [N, D] (its own
    preprocessing, CIFC's: the crop argument is ignored)."""

    image_size = 224

    def __init__(self, state_dict: dict):
        self.model = DinoViT(state_dict)
        shape = self.model.cls_token.shape[-1], self.model.patch, len(self.model.blocks)
        self.paper_name = "DINO ViT-S/16" if shape == PAPER_DINO else None

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> comfy.clip_vision.Output:
        outputs = comfy.clip_vision.Output()
        with torch.no_grad():
            outputs["image_embeds"] = self.model(image.cpu()).to(comfy.model_management.intermediate_device())
        return outputs


def load_backbone(state_dict: dict, name: str):
    """A PaperCLIP or PaperDINO for a checkpoint of either layout.

    Raises:
        CIDMInputError: ("backbone") naming the file when it is neither.
    """
    if is_dino_vit(state_dict):
        return PaperDINO(state_dict)
    if "vision_model.embeddings.class_embedding" in state_dict and "visual_projection.weight" in state_dict:
        return PaperCLIP(state_dict)
    raise CIDMInputError("backbone", f"{name} is neither a CLIP checkpoint in the Hugging Face layout "
                                     "(openai/clip-vit-base-patch32's model.safetensors) nor a DINO ViT "
                                     "(timm's vit_small_patch16_224.dino model.safetensors)")
