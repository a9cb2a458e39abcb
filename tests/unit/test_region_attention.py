"""Region-aware cross-attention (cidm.regions.region_cross_attention) on tiny modules, no ComfyUI."""

import pytest
import torch

from cidm.adapters import ConceptCrossAttention, LayerLoRABank, scaled_dot_product_heads
from cidm.aggregation import ConstantRouter
from cidm.regions import (AttentionBranch, box_mask, prepare_region_attention, region_cross_attention, region_weights,
                          with_projected_contexts)
from test_aggregation import CONTEXT, LAYER, QUERY, TinyCrossAttention, random_factors

H, W = 4, 6  # an attention resolution of 24 image tokens


def wrapper_with(tasks: int, weights: list[float], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    factors = [random_factors(generator, scale=0.5) for _ in range(tasks)]
    return ConceptCrossAttention(TinyCrossAttention(), LAYER, LayerLoRABank(factors, 0.8), ConstantRouter(weights),
                                 num_layers=1, tokens_per_layer=5)


def plain(module, x, context, weights):
    """The ordinary wrapper forward with one task mix for the whole image."""
    module.router.weights = torch.tensor(weights)
    return module.forward_layer(x, context)


def regional(module, x, rows):
    """Region-aware cross-attention of x [B, N, C] for the rows of branches, prepared as a sampling run does."""
    return region_cross_attention(module, module.bank, x, prepare_region_attention(rows, module.bank.num_tasks, x),
                                  scaled_dot_product_heads)


def branches(global_context, global_weights, regions):
    """rows of AttentionBranch for one row: the global branch, then (context, weights, [H, W] canvas mask) per region."""
    shares = region_weights([mask for _, _, mask in regions], H, W) if regions else torch.zeros(0, H, W)
    rows = [AttentionBranch(global_context, global_weights, (1 - shares.sum(0)).flatten())]
    rows += [AttentionBranch(context, weights, share.flatten()) for (context, weights, _), share in zip(regions, shares)]
    return rows


def test_a_token_in_one_region_sees_only_that_regions_prompt_and_concepts():
    torch.manual_seed(0)
    module = wrapper_with(tasks=2, weights=[1.0, 1.0])
    x = torch.randn(1, H * W, QUERY)
    glob, dog, duck = (torch.randn(5, CONTEXT) for _ in range(3))
    left, right = box_mask(0, 0, 0.5, 0.5, (H, W)), box_mask(0.5, 0, 0.5, 1, (H, W))
    rows = [branches(glob, torch.tensor([0.0, 0.0]),
                     [(dog, torch.tensor([1.0, 0.0]), left), (duck, torch.tensor([0.0, 1.0]), right)])]
    out = regional(module, x, rows)[0].reshape(H, W, -1)
    only_dog = plain(module, x, dog[None], [1.0, 0.0])[0].reshape(H, W, -1)
    only_duck = plain(module, x, duck[None], [0.0, 1.0])[0].reshape(H, W, -1)
    base = plain(module, x, glob[None], [0.0, 0.0])[0].reshape(H, W, -1)
    assert torch.allclose(out[:2, :3], only_dog[:2, :3], atol=1e-5)
    assert torch.allclose(out[:, 3:], only_duck[:, 3:], atol=1e-5)
    assert torch.allclose(out[2:, :3], base[2:, :3], atol=1e-5)
    assert not torch.allclose(only_dog[:2, :3], plain(module, x, dog[None], [1.0, 1.0])[0].reshape(H, W, -1)[:2, :3],
                              atol=1e-3)  # the other concept's LoRA would have changed the dog's tokens


def test_without_regions_it_is_the_ordinary_forward():
    torch.manual_seed(1)
    module = wrapper_with(tasks=3, weights=[0.2, 0.5, 0.3])
    x, glob = torch.randn(2, H * W, QUERY), torch.randn(2, 5, CONTEXT)
    weights = torch.tensor([0.2, 0.5, 0.3])
    rows = [branches(glob[b], weights, []) for b in range(2)]
    assert torch.allclose(regional(module, x, rows),
                          plain(module, x, glob, weights.tolist()), atol=1e-5)


def test_overlaps_share_the_token_by_hand_computation():
    torch.manual_seed(2)
    module = wrapper_with(tasks=2, weights=[1.0, 0.0])
    x = torch.randn(1, H * W, QUERY)
    glob, first, second = (torch.randn(5, CONTEXT) for _ in range(3))
    everywhere = torch.ones(H, W)
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    rows = [branches(glob, None, [(first, w1, everywhere), (second, w2, everywhere)])]
    out = regional(module, x, rows)
    # both regions cover every token: shares 1/2 each, q and to_out with the mean task mix, attention averaged
    bank, mix = module.bank, torch.tensor([[0.5, 0.5]])
    q = module.to_q(x) + bank.delta("to_q", x, mix)
    attended = []
    for context, weights in ((first, w1), (second, w2)):
        k = module.to_k(context[None]) + bank.delta("to_k", context[None], weights[None])
        v = module.to_v(context[None]) + bank.delta("to_v", context[None], weights[None])
        attended.append(scaled_dot_product_heads(q, k, v, module.heads))
    mixed = (attended[0] + attended[1]) / 2
    expected = module.to_out(mixed) + bank.delta("to_out.0", mixed, mix)
    assert torch.allclose(out, expected, atol=1e-5)


def test_rows_with_different_context_lengths_and_regions_batch_correctly():
    torch.manual_seed(3)
    module = wrapper_with(tasks=2, weights=[1.0, 0.0])
    x = torch.randn(3, H * W, QUERY)
    mask = box_mask(0.25, 0.25, 0.5, 0.5, (H, W))
    rows = [branches(torch.randn(5, CONTEXT), torch.tensor([0.3, 0.7]), [(torch.randn(5, CONTEXT),
                                                                            torch.tensor([1.0, 0.0]), mask)]),
            branches(torch.randn(10, CONTEXT), None, [(torch.randn(5, CONTEXT), torch.tensor([0.0, 1.0]), mask)]),
            branches(torch.randn(10, CONTEXT), torch.tensor([0.5, 0.5]), [])]
    together = regional(module, x, rows)
    alone = torch.cat([regional(module, x[b:b + 1], [rows[b]])
                       for b in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


@pytest.mark.parametrize("tasks", [0, 2])
def test_a_bank_without_tasks_still_routes_prompts_by_region(tasks):
    torch.manual_seed(4)
    module = wrapper_with(tasks=tasks, weights=[0.0] * tasks)
    x = torch.randn(1, H * W, QUERY)
    glob, region = torch.randn(5, CONTEXT), torch.randn(5, CONTEXT)
    weights = torch.zeros(tasks) if tasks else None
    rows = [branches(glob, weights, [(region, weights, box_mask(0, 0, 1, 0.5, (H, W)))])]
    out = regional(module, x, rows)[0].reshape(H, W, -1)
    top = plain(module, x, region[None], [0.0] * tasks)[0].reshape(H, W, -1)
    assert torch.allclose(out[:2], top[:2], atol=1e-5)
    assert not torch.allclose(out[2:], top[2:], atol=1e-3)


def test_keys_and_values_projected_once_give_the_same_attention_without_projecting_again():
    torch.manual_seed(3)
    module = wrapper_with(tasks=2, weights=[1.0, 1.0])
    x = torch.randn(2, H * W, QUERY)
    glob, dog, duck = (torch.randn(5, CONTEXT) for _ in range(3))
    regions = [(dog, torch.tensor([1.0, 0.0]), box_mask(0, 0, 0.5, 1, (H, W))),
               (duck, torch.tensor([0.0, 1.0]), box_mask(0.5, 0, 0.5, 1, (H, W)))]
    rows = [branches(glob, torch.tensor([1.0, 1.0]), regions), branches(glob, None, regions)]
    inputs = prepare_region_attention(rows, module.bank.num_tasks, x)
    projected = with_projected_contexts(inputs, module, module.bank)
    calls = []
    for name in ("to_k", "to_v"):
        getattr(module, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    every_step = region_cross_attention(module, module.bank, x, inputs, scaled_dot_product_heads)
    assert calls == ["to_k", "to_v"] * len(inputs.groups)
    calls.clear()
    once = region_cross_attention(module, module.bank, x, projected, scaled_dot_product_heads)
    assert calls == [] and torch.allclose(once, every_step, atol=1e-6)
