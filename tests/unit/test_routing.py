"""Per-cond routing (cidm.routing), the named router, and computing only the active tasks' LoRAs (no ComfyUI)."""

import pytest
import torch

from cidm.adapters import LayerLoRABank, low_rank_delta
from cidm.aggregation import ElasticRouter, NamedRouter, make_router
from cidm.errors import CIDMInputError
from cidm.layers import PROJECTIONS
from cidm.routing import CondEntry, LayerwisePrompt, SamplingRoutes, ordinary_context, route_conds

LAYERS, TOKENS, DIM = 3, 4, 6
TASK_TOKENS = [["<dog1>", "<dog2>"], ["<cat1>"], ["<duck1>"]]


def prompt(tokens, seed=0):
    contexts = torch.randn(LAYERS, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))
    return LayerwisePrompt(contexts=contexts if tokens else None, tokens=tuple(tokens), library="lib")


def features(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(len(tokens), LAYERS, DIM, generator=generator) for tokens in TASK_TOKENS]


def test_named_router_weights_exactly_the_named_tasks_in_every_layer():
    router = NamedRouter(TASK_TOKENS)
    both = router.route(prompt(["<dog2>", "<duck1>"]), torch.zeros(TOKENS, DIM), LAYERS)
    assert both.tolist() == [[1.0, 0.0, 1.0]] * LAYERS
    assert not router.route(prompt([]), torch.zeros(TOKENS, DIM), LAYERS).any()
    assert not router.route(None, torch.zeros(TOKENS, DIM), LAYERS).any()  # a stock prompt names nothing


def test_named_elastic_mixes_only_the_named_tasks():
    router = make_router("named-elastic", features(), task_tokens=TASK_TOKENS)
    named = prompt(["<dog1>", "<cat1>"])
    weights = router.route(named, torch.zeros(TOKENS, DIM), LAYERS)
    assert torch.all(weights[:, 2] == 0)
    assert torch.allclose(weights.sum(dim=1), torch.ones(LAYERS))
    elastic = ElasticRouter(features()).route(named, torch.zeros(TOKENS, DIM), LAYERS)
    expected = elastic[:, :2] / elastic[:, :2].sum(dim=1, keepdim=True)
    assert torch.allclose(weights[:, :2], expected)


def test_route_conds_multiplies_by_the_task_multiplier_and_pairs_the_negative():
    router = NamedRouter(TASK_TOKENS)
    conds = [CondEntry("pos", "positive", prompt(["<cat1>"]), torch.randn(1, TOKENS, DIM)),
             CondEntry("neg", "negative", None, torch.randn(1, 3 * TOKENS, DIM))]
    multipliers = torch.tensor([1.0, 0.5, 2.0])
    matched = route_conds(router, conds, multipliers, LAYERS, "match cond")
    assert matched["pos"].tolist() == [[0.0, 0.5, 0.0]] * LAYERS
    assert torch.equal(matched["neg"], matched["pos"])
    own = route_conds(router, conds, multipliers, LAYERS, "own")
    assert not own["neg"].any()


def test_the_negative_gets_every_task_some_positive_applies():
    conds = [CondEntry("dog", "positive", prompt(["<dog1>"]), None),
             CondEntry("cat", "positive", prompt(["<cat1>"]), None),
             CondEntry("neg", "negative", prompt([]), None)]
    table = route_conds(NamedRouter(TASK_TOKENS), conds, torch.ones(3), LAYERS)
    assert table["neg"].tolist() == [[1.0, 1.0, 0.0]] * LAYERS


def test_the_negative_is_never_paired_with_a_spatial_cond():
    """Issue 29, kind 1: a region's prompt (or an area or masked cond) names <cat>, the global prompt names <dog>
    or nothing; the negative covers the whole canvas, so it gets the global prompt's concepts only."""
    for global_tokens, expected in ((["<dog1>"], [1.0, 0.0, 0.0]), ([], [0.0, 0.0, 0.0])):
        conds = [CondEntry("global", "positive", prompt(global_tokens), None),
                 CondEntry("region", "region_0", prompt(["<cat1>"]), None, spatial=True),
                 CondEntry("masked", "positive", prompt(["<duck1>"]), None, spatial=True),
                 CondEntry("neg", "negative", prompt([]), None)]
        table = route_conds(NamedRouter(TASK_TOKENS), conds, torch.ones(3), LAYERS)
        assert table["neg"].tolist() == [expected] * LAYERS, global_tokens
        assert table["region"].tolist() == [[0.0, 1.0, 0.0]] * LAYERS
    only_spatial = [CondEntry("region", "region_0", prompt(["<cat1>"]), None, spatial=True),
                    CondEntry("neg", "negative", prompt(["<cat1>"]), None)]
    assert not route_conds(NamedRouter(TASK_TOKENS), only_spatial, torch.ones(3), LAYERS)["neg"].any()


def test_a_prompt_encoded_for_another_layer_count_is_refused():
    with pytest.raises(CIDMInputError, match="conditioning: the prompt was encoded for 3 layers, the model has 16"):
        route_conds(NamedRouter(TASK_TOKENS), [CondEntry("p", "positive", prompt(["<cat1>"]), None)],
                    torch.ones(3), 16)


def test_layer_context_replaces_only_cidm_chunks_and_keeps_the_whole_negative():
    routes = SamplingRoutes()
    named = prompt(["<dog1>"], seed=3)
    routes.add_conds([CondEntry("pos", "positive", named, None), CondEntry("neg", "negative", None, None)])
    negative = torch.randn(2, 3 * TOKENS, DIM)  # a 3-chunk stock negative: the batch context has 3·T tokens
    positive = ordinary_context(named.contexts).repeat(2, 3, 1)
    context = torch.cat([negative, positive])  # cond_or_uncond [1, 0], two rows per chunk
    layer1 = routes.layer_context(1, ["neg", "pos"], context)
    assert torch.equal(layer1[:2], negative)
    assert torch.equal(layer1[2:], named.contexts[1].repeat(3, 1).expand(2, -1, -1))
    plain = SamplingRoutes()
    plain.add_conds([CondEntry("p", "positive", prompt([]), None)])
    rows = context[:2]
    assert plain.layer_context(0, ["p"], rows) is rows  # nothing named: the tensor is untouched


def test_an_unknown_cond_is_an_error_not_a_silent_skip():
    routes = SamplingRoutes()
    with pytest.raises(CIDMInputError, match="conditioning"):
        routes.layer_context(0, ["never-registered"], torch.zeros(1, TOKENS, DIM))


def test_row_weights_follow_the_uuid_chunks():
    routes = SamplingRoutes()
    routes.weights["a"] = {"x": torch.tensor([[1.0, 0.0]] * LAYERS), "y": torch.tensor([[0.0, 2.0]] * LAYERS)}
    routes.add_conds([CondEntry("x", "positive", None, None), CondEntry("y", "negative", None, None)])
    assert routes.row_weights("a", 2, ["y", "x"], 4).tolist() == [[0, 2], [0, 2], [1, 0], [1, 0]]


def test_selected_tasks_give_the_same_delta_as_all_tasks_with_zero_weights():
    generator = torch.Generator().manual_seed(0)
    rank, width = 2, 5
    tasks = [{p: (torch.randn(rank, width, generator=generator), torch.randn(width, rank, generator=generator))
              for p in PROJECTIONS} for _ in range(4)]
    bank = LayerLoRABank(tasks, scale=0.8)
    x = torch.randn(2, 3, width, generator=generator)
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 2.0]])
    full = bank.delta("to_k", x, weights)
    down, up = bank.select("to_k", [1, 3], x.device, x.dtype)
    assert down.shape == (2 * rank, width) and up.shape == (width, 2 * rank)
    assert torch.allclose(low_rank_delta(x, down, up, weights[:, [1, 3]], rank, 0.8), full, atol=1e-6)
