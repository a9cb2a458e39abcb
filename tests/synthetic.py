"""Synthetic concept libraries for a generated checkpoint, written with the pack's own library code.

Used where a trained library is not the point of the test: routing, aggregation and the pack-node sampling path.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from cidm.family import FAMILIES, SD15, SDXL
from cidm.layers import PROJECTIONS, base_model_fingerprint
from cidm.library import ConceptLibrary, TaskData
from cidm.tokens import token_embedding_fingerprint

UNET = "model.diffusion_model."
# Each family's token-embedding tables, in tower order (cidm.family): SD1.5's CLIP-L; SDXL's CLIP-L and CLIP-G
# (as scripts/make_test_checkpoint.py writes them).
_EMBEDDING = "text_model.embeddings.token_embedding.weight"
TOKEN_EMBEDDINGS = {SD15.name: [f"cond_stage_model.transformer.{_EMBEDDING}"],
                    SDXL.name: [f"conditioner.embedders.0.transformer.{_EMBEDDING}",
                                f"conditioner.embedders.1.model.transformer.{_EMBEDDING}"]}
_STAGES = ("input_blocks", "middle_block", "output_blocks")


def checkpoint_layers(checkpoint: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The attn2 paths of a checkpoint in CIDM order, and each projection's (out, in) shape at layer 0."""
    with safe_open(str(checkpoint), "pt") as f:
        keys = [k for k in f.keys() if k.startswith(UNET) and k.endswith(".attn2.to_k.weight")]
        paths = sorted({k[len(UNET):-len(".to_k.weight")] for k in keys},
                       key=lambda p: (_STAGES.index(p.split(".")[0]), [int(n) for n in re.findall(r"\d+", p)]))
        shapes = {}
        for path in paths:
            for proj in PROJECTIONS:
                shapes[(path, proj)] = tuple(f.get_slice(f"{UNET}{path}.{proj}.weight").get_shape())
    return paths, shapes


def checkpoint_base_model(checkpoint: Path) -> dict:
    """What the pack records of a generated checkpoint's base model (nodes/host/model.py:base_model_info)."""
    paths, shapes = checkpoint_layers(checkpoint)
    context_dim = shapes[(paths[0], "to_k")][1]
    family = next(f for f in FAMILIES if f.context_dim == context_dim)
    with safe_open(str(checkpoint), "pt") as f:
        fingerprint = base_model_fingerprint(lambda key: f.get_tensor(UNET + key).float(), len(paths))
        tables = [f.get_tensor(key) for key in TOKEN_EMBEDDINGS[family.name]]
    return {"fingerprint": fingerprint, "family": family.name, "num_layers": len(paths), "context_dim": context_dim,
            "layer_paths": paths, "token_slots": family.token_slots(paths),
            "text_encoder": token_embedding_fingerprint(torch.cat(tables, dim=-1))}


def synthesize_library(checkpoint: Path, root: Path, concepts: list[str], rank: int = 4, seed: int = 0,
                       lora_std: float = 0.05, multiplier: float = 1.0,
                       token_slots: list[int] | None = None, twins: bool = False) -> ConceptLibrary:
    """A library with one task per concept: random LoRA factors and embeddings, and concept features that are
    distinct random directions (so routing between them is separable). `token_slots`: the library's map (None: the
    family's default, as training records it). `twins`: every concept gets the same factors, embeddings and
    features (concepts nothing can tell apart). An existing library at `root` gets the concepts appended."""
    info = checkpoint_base_model(checkpoint)
    if token_slots is not None:
        info["token_slots"] = token_slots
    paths, shapes = checkpoint_layers(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    library = ConceptLibrary.open_or_create(root, info)
    for number, concept in enumerate(concepts):
        if twins:
            generator = torch.Generator().manual_seed(seed)
        lora = {}
        for layer, path in enumerate(paths):
            for proj in PROJECTIONS:
                out_features, in_features = shapes[(path, proj)]
                lora[(layer, proj)] = (torch.randn(rank, in_features, generator=generator) * lora_std,
                                       torch.randn(out_features, rank, generator=generator) * lora_std)
        tokens = [f"<{concept}{i}>" for i in (1, 2)]
        embeddings = torch.randn(len(tokens), max(info["token_slots"]) + 1, info["context_dim"],
                                 generator=generator) * 0.02
        features = torch.randn(len(tokens), len(paths), info["context_dim"], generator=generator)
        library.append_task(concept=concept, tokens=tokens, method="cidm", rank=rank, multiplier=multiplier, steps=0,
                            seed=seed + number, hyperparameters={"synthetic": True},
                            data=TaskData(lora=lora, embeddings=embeddings, features=features))
    return library


def _normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * 0.02).half()


def _layers(generator: torch.Generator, prefix: str, width: int, count: int, layout: tuple) -> dict:
    """Random pre-norm transformer layers `prefix`<index>.<name>: `layout` is (norm names, {linear name: (rows,
    columns) in multiples of `width`})."""
    norms, linears = layout
    tensors = {}
    for index in range(count):
        for norm in norms:
            tensors[f"{prefix}{index}.{norm}.weight"] = torch.ones(width).half()
            tensors[f"{prefix}{index}.{norm}.bias"] = torch.zeros(width).half()
        for name, (rows, columns) in linears.items():
            tensors[f"{prefix}{index}.{name}.weight"] = _normal(generator, rows * width, columns * width)
            tensors[f"{prefix}{index}.{name}.bias"] = _normal(generator, rows * width)
    return tensors


CLIP_LAYER = (("layer_norm1", "layer_norm2"), {"self_attn.q_proj": (1, 1), "self_attn.k_proj": (1, 1),
                                               "self_attn.v_proj": (1, 1), "self_attn.out_proj": (1, 1),
                                               "mlp.fc1": (4, 1), "mlp.fc2": (1, 4)})
DINO_LAYER = (("norm1", "norm2"), {"attn.qkv": (3, 1), "attn.proj": (1, 1), "mlp.fc1": (4, 1), "mlp.fc2": (1, 4)})


def clip_checkpoint(seed: int = 0, width: int = 768, patch: int = 32, layers: int = 12, text_width: int = 512,
                    projection: int = 512) -> dict[str, torch.Tensor]:
    """Random weights in the Hugging Face layout of openai/clip-vit-base-patch32 (its sizes by default), fp16."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"vision_model.embeddings.class_embedding": _normal(generator, width),
               "vision_model.embeddings.patch_embedding.weight": _normal(generator, width, 3, patch, patch),
               "vision_model.embeddings.position_embedding.weight": _normal(generator, (224 // patch) ** 2 + 1, width),
               **{f"vision_model.{norm}.{kind}": (torch.ones if kind == "weight" else torch.zeros)(width).half()
                  for norm in ("pre_layrnorm", "post_layernorm") for kind in ("weight", "bias")},
               "visual_projection.weight": _normal(generator, projection, width),
               "text_model.embeddings.token_embedding.weight": _normal(generator, 49408, text_width),
               "text_model.embeddings.position_embedding.weight": _normal(generator, 77, text_width),
               "text_model.final_layer_norm.weight": torch.ones(text_width).half(),
               "text_model.final_layer_norm.bias": torch.zeros(text_width).half(),
               "text_projection.weight": _normal(generator, projection, text_width),
               "logit_scale": torch.tensor(4.6052).half()}
    tensors |= _layers(generator, "vision_model.encoder.layers.", width, layers, CLIP_LAYER)
    tensors |= _layers(generator, "text_model.encoder.layers.", text_width, layers, CLIP_LAYER)
    return tensors


def dino_checkpoint(seed: int = 0, width: int = 384, patch: int = 16, depth: int = 12) -> dict[str, torch.Tensor]:
    """Random weights in DINO's ViT layout (dino_vits16's sizes by default), fp16."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"cls_token": _normal(generator, 1, 1, width),
               "pos_embed": _normal(generator, 1, (224 // patch) ** 2 + 1, width),
               "patch_embed.proj.weight": _normal(generator, width, 3, patch, patch),
               "patch_embed.proj.bias": _normal(generator, width),
               "norm.weight": torch.ones(width).half(), "norm.bias": torch.zeros(width).half()}
    return tensors | _layers(generator, "blocks.", width, depth, DINO_LAYER)
