"""Elastic weight aggregation and the multi-concept cross-attention, on tiny modules (no ComfyUI)."""

import math

import pytest
import torch
from torch import nn

from cidm.adapters import ConceptCrossAttention, LayerLoRABank, scaled_dot_product_heads
from cidm.aggregation import ConstantRouter, ElasticRouter, ewa_weights, make_router, match_uncond_to_cond
from cidm.errors import CIDMInputError
from cidm.layers import PROJECTIONS, CrossAttentionLayer

QUERY, CONTEXT, HEADS, RANK = 8, 6, 2, 2


class TinyCrossAttention(nn.Module):
    """The attribute layout of ComfyUI's CrossAttention and diffusers' Attention."""

    def __init__(self):
        super().__init__()
        self.heads = HEADS
        self.to_q = nn.Linear(QUERY, QUERY, bias=False)
        self.to_k = nn.Linear(CONTEXT, QUERY, bias=False)
        self.to_v = nn.Linear(CONTEXT, QUERY, bias=False)
        self.to_out = nn.Sequential(nn.Linear(QUERY, QUERY), nn.Dropout(0.0))

    def forward(self, x, context):
        return self.to_out(scaled_dot_product_heads(self.to_q(x), self.to_k(context), self.to_v(context), HEADS))


LAYER = CrossAttentionLayer(index=1, path="input_blocks.1.1.transformer_blocks.0.attn2", query_dim=QUERY,
                            context_dim=CONTEXT, heads=HEADS)


def random_factors(generator, scale=0.3):
    return {proj: (torch.randn(RANK, inp, generator=generator) * scale, torch.randn(out, RANK, generator=generator) * scale)
            for proj, (out, inp) in LAYER.projection_shapes().items()}


def test_ewa_weights_equal_hand_computation():
    # Two tasks with one concept token each; features e1 = (1,0), e2 = (0,1). One sample with context tokens
    # c1 = (1,1)/√2·k and c2 = (1,0): cos(e1,c1)=1/√2, cos(e1,c2)=1 -> s1 = 1; cos(e2,c1)=1/√2, cos(e2,c2)=0 -> s2 = 1/√2.
    # g = (1, 0.7071); g^4 = (1, 0.25); L1-normalised -> (0.8, 0.2).
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    context = torch.tensor([[[3.0, 3.0], [2.0, 0.0]]])
    weights = ewa_weights(context, features, [(0, 1), (1, 2)], power=4)
    assert torch.allclose(weights, torch.tensor([[0.8, 0.2]]), atol=1e-6)
    # A task of two tokens averages its tokens' best similarities before the power: s = (1, 1/√2, 0.5) with
    # the third feature (1,1)/|..| ... use a 3rd token e3 = (-1, 0): best cos = max(-1/√2, -1) = -0.7071.
    features3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    weights3 = ewa_weights(context, features3, [(0, 1), (1, 3)], power=4)
    g2 = (1 / math.sqrt(2) - 1 / math.sqrt(2)) / 2  # = 0
    expected = torch.tensor([[1.0, g2 ** 4]]) / (1.0 + g2 ** 4)
    assert torch.allclose(weights3, expected, atol=1e-6)


def test_one_task_weight_one_equals_merged_lora():
    generator = torch.Generator().manual_seed(0)
    original = TinyCrossAttention()
    factors = random_factors(generator)
    scale = 0.8
    wrapper = ConceptCrossAttention(original, LAYER, LayerLoRABank([factors], scale), ConstantRouter([1.0]),
                                    num_layers=1, tokens_per_layer=5)
    x, context = torch.randn(2, 4, QUERY, generator=generator), torch.randn(2, 5, CONTEXT, generator=generator)
    ours = wrapper.forward_layer(x, context)

    merged = TinyCrossAttention()
    merged.load_state_dict(original.state_dict())
    with torch.no_grad():
        for proj, (down, up) in factors.items():
            linear = merged.to_out[0] if proj == "to_out.0" else getattr(merged, proj)
            linear.weight += scale * up @ down
    assert torch.allclose(ours, merged(x, context), atol=1e-5)
    assert not torch.allclose(ours, original(x, context), atol=1e-3)  # the LoRA really acts


def test_identical_layer_contexts_equal_stock_attention():
    generator = torch.Generator().manual_seed(1)
    original = TinyCrossAttention()
    num_layers, tokens = 4, 5
    x, context = torch.randn(2, 3, QUERY, generator=generator), torch.randn(2, tokens, CONTEXT, generator=generator)
    packed = context.repeat(1, num_layers, 1)  # [B, L·T, D] with identical copies
    wrapper = ConceptCrossAttention(original, LAYER, LayerLoRABank([], 1.0), ConstantRouter([]),
                                    num_layers=num_layers, tokens_per_layer=tokens)
    assert torch.allclose(wrapper.forward_layer(x, packed), original(x, context), atol=1e-6)
    # A plain (unpacked) context passes through unchanged as well.
    assert torch.allclose(wrapper.forward_layer(x, context), original(x, context), atol=1e-6)


def test_wrapper_routes_its_own_layer_slice():
    generator = torch.Generator().manual_seed(2)
    original = TinyCrossAttention()
    layers, tokens = 3, 4
    contexts = [torch.randn(1, tokens, CONTEXT, generator=generator) for _ in range(layers)]
    wrapper = ConceptCrossAttention(original, LAYER, LayerLoRABank([], 1.0), ConstantRouter([]),
                                    num_layers=layers, tokens_per_layer=tokens)
    x = torch.randn(1, 2, QUERY, generator=generator)
    assert torch.allclose(wrapper.forward_layer(x, torch.cat(contexts, dim=1)), original(x, contexts[LAYER.index]))


def test_wrapper_keeps_projection_names_for_host_lora_patches():
    wrapper = ConceptCrossAttention(TinyCrossAttention(), LAYER, LayerLoRABank([], 1.0), ConstantRouter([]), 1)
    names = {name for name, _ in wrapper.named_parameters()}
    assert names == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}


def separable_library(tasks=5, tokens=2, layers=3, dim=768, seed=3):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]
    return [basis[t * tokens:(t + 1) * tokens].unsqueeze(1).repeat(1, layers, 1) * 5 for t in range(tasks)]


@pytest.mark.parametrize("mode, minimum", [("elastic", 0.99), ("one-hot", 1.0)])
def test_separable_features_route_to_the_right_task(mode, minimum):
    features = separable_library()
    router = make_router(mode, features)
    generator = torch.Generator().manual_seed(4)
    for task, task_features in enumerate(features):
        for layer in range(3):
            # The prompt holds the task's concept tokens among unrelated tokens (random directions in 768-d, as CLIP's are).
            noise = torch.randn(1, 10, 768, generator=generator)
            context = torch.cat([noise, task_features[:, layer].unsqueeze(0)], dim=1)
            weights = router(layer, context, None)[0]
            assert weights[task] >= minimum, (task, layer, weights)
            if mode == "one-hot":
                assert weights.sum() == 1.0


def test_uncond_rows_reuse_paired_cond_weights():
    weights = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])  # chunks: uncond (2 rows), cond (2 rows)
    matched = match_uncond_to_cond(weights, [1, 0])
    assert torch.equal(matched[:2], weights[2:]) and torch.equal(matched[2:], weights[2:])
    assert torch.equal(match_uncond_to_cond(weights, [0]), weights)  # no pair in this call: own weights
    features = separable_library(tasks=2)
    own = ElasticRouter(features, uncond="own")
    context = torch.cat([torch.randn(1, 4, 768), features[0][:, 0].unsqueeze(0)], dim=1)
    empty = torch.randn(1, 6, 768)
    batch = torch.cat([empty, context])
    assert not torch.allclose(own(0, batch, [1, 0])[0], own(0, batch, [1, 0])[1])


def test_bad_mode_and_fixed_weights_name_the_input():
    with pytest.raises(CIDMInputError, match="mode"):
        make_router("softmax", separable_library(tasks=2))
    with pytest.raises(CIDMInputError, match="weights"):
        make_router("fixed", separable_library(tasks=2), fixed_weights=[1.0])
    fixed = make_router("fixed", separable_library(tasks=2), fixed_weights=[0.25, 0.75])
    assert torch.equal(fixed(0, torch.zeros(3, 2, 768), None), torch.tensor([[0.25, 0.75]] * 3))


def test_bank_batches_tasks_with_per_sample_weights():
    generator = torch.Generator().manual_seed(5)
    tasks = [random_factors(generator) for _ in range(3)]
    bank = LayerLoRABank(tasks, scale=0.5)
    x = torch.randn(2, 4, QUERY, generator=generator)
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    for proj in PROJECTIONS:
        if proj in ("to_k", "to_v"):
            continue
        expected = torch.stack([sum(0.5 * w * (x[b] @ tasks[t][proj][0].T @ tasks[t][proj][1].T)
                                    for t, w in enumerate(weights[b])) for b in range(2)])
        assert torch.allclose(bank.delta(proj, x, weights), expected, atol=1e-5)


def test_folded_weight_equals_the_low_rank_branch_of_its_tasks():
    generator = torch.Generator().manual_seed(6)
    tasks = [random_factors(generator) for _ in range(3)]
    bank = LayerLoRABank(tasks, scale=0.5)
    x = torch.randn(2, 4, QUERY, generator=generator)
    base = torch.randn(QUERY, QUERY, generator=generator)
    row = torch.tensor([0.7, 1.5])  # tasks 0 and 2; task 1 unselected
    folded = bank.folded("to_q", [0, 2], row, base)
    expected = x @ base.T + bank.delta("to_q", x, torch.tensor([[0.7, 0.0, 1.5]] * 2))
    assert folded.dtype == base.dtype and torch.allclose(x @ folded.T, expected, atol=1e-5)
    assert not torch.allclose(folded, bank.folded("to_q", [0, 1], row, base))  # the chosen tasks count
    assert torch.equal(bank.folded("to_q", [0], torch.tensor([0.0]), base.half()), base.half())
