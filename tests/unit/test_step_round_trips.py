"""A sampling step after the first makes no host round trip: no copy of a run's constant host tensors to the model's
device and no read-back to the host. On a GPU either one waits for the launch queue to drain, in every layer of
every step (benchmarks/results/gpu-h200.md: named routing cost 1.6× stock there). This machine has no GPU, so the
copies are made visible as dtype conversions: the model runs in bfloat16 while the run's data is float32."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cidm.routing import LayerwisePrompt, SamplingRoutes
from test_region_attention import H, W, branches, wrapper_with
from test_aggregation import CONTEXT, QUERY
from cidm.adapters import scaled_dot_product_heads
from cidm.regions import box_mask, prepare_region_attention, region_cross_attention

ROUND_TRIPS = {"_to_copy", "_local_scalar_dense", "nonzero", "lift_fresh", "lift_fresh_copy"}


class OpLog(TorchDispatchMode):
    """Records the name of every aten operation run inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def round_trips(step) -> list[str]:
    with OpLog() as log:
        step()
    return [name for name in log.names if name in ROUND_TRIPS]


def test_the_op_log_sees_copies_and_read_backs():
    host = torch.ones(3)
    assert round_trips(lambda: host.to(torch.bfloat16)) == ["_to_copy"]
    assert round_trips(lambda: bool((host > 0).any())) == ["_local_scalar_dense"]


def test_layer_context_copies_a_prompts_layer_context_once_per_run():
    contexts = torch.randn(3, 5, CONTEXT)
    routes = SamplingRoutes()
    routes.prompts.update({"cidm": LayerwisePrompt(contexts, ("<dog>",), "lib"), "stock": None})
    batch = torch.randn(2, 10, CONTEXT, dtype=torch.bfloat16)
    first = routes.layer_context(1, ["cidm", "stock"], batch)
    assert round_trips(lambda: routes.layer_context(1, ["cidm", "stock"], batch)) == []
    assert torch.equal(first[0], contexts[1].repeat(2, 1).to(torch.bfloat16)) and torch.equal(first[1], batch[1])


def test_region_attention_step_makes_no_round_trip_once_prepared():
    torch.manual_seed(0)
    module = wrapper_with(tasks=2, weights=[1.0, 1.0]).to(torch.bfloat16)
    x = torch.randn(2, H * W, QUERY, dtype=torch.bfloat16)
    glob, dog, duck = (torch.randn(5, CONTEXT) for _ in range(3))
    regions = [(dog, torch.tensor([1.0, 0.0]), box_mask(0, 0, 0.5, 1, (H, W))),
               (duck, torch.tensor([0.0, 1.0]), box_mask(0.5, 0, 0.5, 1, (H, W)))]
    rows = [branches(glob, torch.tensor([1.0, 1.0]), regions), branches(glob, None, regions)]
    inputs = prepare_region_attention(rows, module.bank.num_tasks, x)

    def step():
        return region_cross_attention(module, module.bank, x, inputs, scaled_dot_product_heads)

    first = step()  # places the bank's factors on the device in this dtype (LayerLoRABank.frozen_on)
    assert round_trips(step) == []
    assert torch.equal(step(), first)


def test_a_run_cache_makes_each_value_once_until_it_forgets():
    routes, made = SamplingRoutes(), []
    for _ in range(2):
        routes.cached("key", lambda: made.append(1) or len(made))
    assert made == [1] and routes.cached("key", lambda: 99) == 1
    routes.forget()
    assert routes.cached("key", lambda: 99) == 99
