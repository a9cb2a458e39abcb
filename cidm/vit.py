"""DINO's ViT (Caron et al., 2021), for the DINO score of CIDM's evaluation (JiahuaDong/CIFC@9819aa84 evaluate.py
lines 67-89: torch.hub `facebookresearch/dino:main` `dino_vits16`, the CLS token of the last layer).

ComfyUI's image encoders cannot host it (comfy/image_encoders/dino2.py fixes DINOv2's 14-pixel patches at 518 px and
its layer scales), and timm would bring torchvision, so the model is torch's own pre-norm TransformerEncoderLayer
stack on the checkpoint's weights. Checkpoint layout: DINO's `vision_transformer.py` (facebookresearch/dino@7c446df,
as timm's `vit_small_patch16_224.dino` stores it): `cls_token` [1, 1, D], `pos_embed` [1, 1 + P, D],
`patch_embed.proj` (a conv of the patch size), `blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`,
`norm`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import CIDMInputError

HEAD_WIDTH = 64  # every DINO ViT (S, B) has 64-wide heads
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224  # CIFC evaluate.py: Resize(256, bicubic) -> CenterCrop(224)
# DINO keys -> torch.nn.TransformerEncoderLayer keys (in_proj packs q, k, v in this order, as DINO's qkv does)
BLOCK_KEYS = {"norm1": "norm1", "attn.qkv": "self_attn.in_proj", "attn.proj": "self_attn.out_proj",
              "norm2": "norm2", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}


def is_dino_vit(state_dict: dict) -> bool:
    return "cls_token" in state_dict and "pos_embed" in state_dict and "blocks.0.attn.qkv.weight" in state_dict


class DinoViT(nn.Module):
    """A DINO ViT whose sizes come from its checkpoint. `forward(images)`: IMAGE [N, H, W, 3] in [0, 1] -> the CLS
    embedding [N, D] after the final norm, preprocessed as CIFC does.

    Raises:
        CIDMInputError: ("backbone") for a checkpoint whose positions do not fit 224-pixel inputs, or with a key
            that is not DINO's (`converted`).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        """Builds the model on `state_dict`'s weights (DINO's keys; a classification head is ignored).

        Raises:
            CIDMInputError: ("backbone") when the positions do not fit 224-pixel inputs or a key is not DINO's.
        """
        super().__init__()
        width = state_dict["cls_token"].shape[-1]
        depth = 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key)))
        self.patch = state_dict["patch_embed.proj.weight"].shape[-1]
        if state_dict["pos_embed"].shape[1] != 1 + (CROP // self.patch) ** 2:
            raise CIDMInputError("backbone", f"a DINO ViT with {self.patch}-pixel patches needs "
                                             f"{1 + (CROP // self.patch) ** 2} positions at {CROP} px; this one has "
                                             f"{state_dict['pos_embed'].shape[1]}")
        self.patch_embed = nn.Conv2d(3, width, self.patch, self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros_like(state_dict["pos_embed"]))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, width // HEAD_WIDTH, state_dict["blocks.0.mlp.fc1.weight"].shape[0],
                                       dropout=0.0, activation="gelu", layer_norm_eps=1e-6, batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.load_state_dict(self.converted(state_dict))
        self.eval()

    @staticmethod
    def converted(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """DINO's keys under this module's names; the classification head, if any, is left out.

        Raises:
            CIDMInputError: ("backbone") naming a key that is neither DINO's nor a head's.
        """
        out = {}
        for key, tensor in state_dict.items():
            block = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
            if block and block.group(2) in BLOCK_KEYS:
                index, part, kind = block.groups()
                joint = "_" if part == "attn.qkv" else "."  # in_proj_weight, but out_proj.weight
                out[f"blocks.{index}.{BLOCK_KEYS[part]}{joint}{kind}"] = tensor.float()
            elif key.startswith("patch_embed.proj."):
                out[key.replace("patch_embed.proj.", "patch_embed.")] = tensor.float()
            elif key in ("cls_token", "pos_embed", "norm.weight", "norm.bias"):
                out[key] = tensor.float()
            elif not key.startswith("head"):
                raise CIDMInputError("backbone", f"{key!r} is not a key of a DINO ViT checkpoint")
        return out

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [N, H, W, 3] -> [N, 3, 224, 224]: shortest side to 256 (bicubic), centre crop 224, ImageNet
        mean/std."""
        x = images[..., :3].movedim(-1, 1).float()
        scale = RESIZE / min(x.shape[-2:])
        x = nn.functional.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)),
                                      mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - CROP) // 2, (x.shape[-1] - CROP) // 2
        x = x[..., top:top + CROP, left:left + CROP]
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.preprocess(images)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]
