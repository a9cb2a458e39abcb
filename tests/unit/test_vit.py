"""Issue 34: DINO's ViT as cidm.vit runs it, against DINO's block written out by hand (facebookresearch/dino
vision_transformer.py: x + attn(norm1(x)), x + mlp(norm2(x)), qkv split as q, k, v by head, exact GELU, eps 1e-6)."""

import pytest
import torch

from cidm.errors import CIDMInputError
from cidm.vit import CROP, DinoViT, is_dino_vit
from tests.synthetic import dino_checkpoint


def reference(state: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """The CLS embedding of preprocessed `pixels` [N, 3, 224, 224], computed from DINO's own keys."""
    state = {k: v.float() for k, v in state.items()}
    norm = torch.nn.functional.layer_norm
    x = torch.nn.functional.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                                   stride=state["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    width = x.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = norm(x, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"], 1e-6)
        qkv = (h @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(len(x), -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        h = (attention @ v).transpose(1, 2).reshape(len(x), -1, width)
        x = x + h @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        h = norm(x, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-6)
        h = torch.nn.functional.gelu(h @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        x = x + h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    return norm(x, (width,), state["norm.weight"], state["norm.bias"], 1e-6)[:, 0]


def test_dino_vit_matches_dinos_block_on_its_own_keys():
    state = dino_checkpoint(seed=3, width=128, depth=2)
    state = {k: (v.float() * 20).half() if k.endswith("weight") and v.dim() == 2 else v for k, v in state.items()}
    model = DinoViT(state | {"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)})  # a head is ignored
    images = torch.rand(2, 300, 260, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(images)
        expected = reference(state, model.preprocess(images), heads=2)
    assert ours.shape == (2, 128)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert is_dino_vit(state) and not is_dino_vit({"vision_model.embeddings.class_embedding": 0})


def test_dino_preprocessing_resizes_the_short_side_to_256_and_crops_224():
    model = DinoViT(dino_checkpoint(width=64, depth=1))
    image = torch.zeros(1, 512, 1024, 3)
    image[:, :, 512:] = 1.0  # right half white: after the crop, the centre column splits it
    pixels = model.preprocess(image)
    assert pixels.shape == (1, 3, CROP, CROP)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(pixels[0, :, 0, -1], (1 - mean) / std)


def test_a_checkpoint_that_is_not_dinos_is_refused_naming_the_input():
    state = dino_checkpoint(width=64, depth=1)
    with pytest.raises(CIDMInputError, match="backbone: 'blocks.0.attn.q.weight' is not a key"):
        DinoViT(state | {"blocks.0.attn.q.weight": torch.zeros(64, 64)})
    with pytest.raises(CIDMInputError, match="backbone: a DINO ViT with 16-pixel patches needs 197 positions"):
        DinoViT(state | {"pos_embed": torch.zeros(1, 50, 64)})
