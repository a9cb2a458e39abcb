"""Each regularizer against a hand computation, its gradient direction, and its zero cases."""

import pytest
import torch

from cidm.consolidation import (CIDMConsolidator, ConsolidationWeights, SharedBasis, make_consolidator)

KEY = (0, "to_k")


def factors(down, up):
    return {KEY: (torch.tensor(down, dtype=torch.float64), torch.tensor(up, dtype=torch.float64))}


def trainable(task):
    return {key: (d.clone().requires_grad_(True), u.clone().requires_grad_(True)) for key, (d, u) in task.items()}


def test_official_matches_hand_computation_and_pulls_up_toward_one():
    old = factors([[1.0, 0.0]], [[1.0], [2.0]])  # r = 1, in = 2, out = 2
    cur = trainable(factors([[0.0, 1.0]], [[0.5], [-1.0]]))
    loss = make_consolidator("cidm-official", [old], ConsolidationWeights(official=0.1)).loss(cur, 0)
    # B_t B_1ᵀ = [[0.5, 1.0], [-1, -2]]: mean |.| = 1.125; mean (B_t - 1)² = (0.25 + 4) / 2 = 2.125
    assert loss.item() == pytest.approx(0.1 * 1.125 + 0.1 * 2.125)
    loss.backward()
    up_grad = cur[KEY][1].grad
    # enhancement term dominates: gradient descent moves the entry at -1 up toward 1
    assert up_grad[1, 0] < 0


def test_official_is_zero_for_the_first_task():
    cur = trainable(factors([[0.0, 1.0]], [[0.5], [-1.0]]))
    assert make_consolidator("cidm-official", [], ConsolidationWeights()).loss(cur, 0).item() == 0


def test_clora_matches_hand_computation_and_shrinks_overlap():
    old = factors([[1.0, 0.0]], [[1.0], [0.0]])  # M = ΔW_old = [[1, 0], [0, 0]]: mean(M²) = 1/4
    cur = trainable(factors([[2.0, 1.0]], [[1.0], [1.0]]))  # ΔW_t = [[2, 1], [2, 1]]
    weights = ConsolidationWeights(clora=3.0)
    consolidator = make_consolidator("c-lora", [old], weights)
    assert consolidator.uses_old_in_forward
    loss = consolidator.loss(cur, 0)
    # only the (0, 0) entry overlaps: mean((M ⊙ ΔW_t)²) = (1·2)² / 4 = 1, divided by mean(M²)² = 1/16
    assert loss.item() == pytest.approx(3.0 * 16.0)
    loss.backward()
    down, up = cur[KEY]
    # L = 3·16·(A[0,0]·B[0])²/4 = 12·(A[0,0]·B[0])²: dL/dA[0,0] = 24·A·B·B = 48, dL/dB[0] = 24·A·B·A = 96
    assert down.grad[0, 0].item() == pytest.approx(48.0)
    assert up.grad[0, 0].item() == pytest.approx(96.0)
    assert down.grad[0, 1].item() == 0 and up.grad[1, 0].item() == 0


@pytest.mark.parametrize("scale", [1e-3, 0.5, 40.0])
def test_clora_normalised_penalty_does_not_depend_on_the_weights_scale(scale):
    generator = torch.Generator().manual_seed(0)
    old = [{KEY: (torch.randn(2, 5, generator=generator, dtype=torch.float64),
                  torch.randn(3, 2, generator=generator, dtype=torch.float64))} for _ in range(2)]
    cur = {KEY: (torch.randn(2, 5, generator=generator, dtype=torch.float64),
                 torch.randn(3, 2, generator=generator, dtype=torch.float64))}

    def penalty(s):  # every weight scaled by s: each ΔW = B A by s²
        scaled = [{KEY: (d * s, u * s)} for task in old for d, u in task.values()]
        return make_consolidator("c-lora", scaled, ConsolidationWeights()).loss({KEY: (cur[KEY][0] * s,
                                                                                      cur[KEY][1] * s)}, 0).item()

    assert penalty(1.0) > 0
    assert penalty(scale) == pytest.approx(penalty(1.0), rel=1e-9)


def test_clora_regularises_only_key_and_value_where_old_updates_changed_the_weights():
    consolidator = make_consolidator("c-lora", [], ConsolidationWeights())
    assert consolidator.trained_projections == ("to_k", "to_v") and not consolidator.class_word_in_prompt
    old = {(0, "to_q"): (torch.ones(1, 2), torch.ones(2, 1)), (0, "to_k"): (torch.zeros(1, 2), torch.zeros(2, 1))}
    cur = {key: (torch.ones(1, 2), torch.ones(2, 1)) for key in old}
    # to_q is not trained by C-LoRA, and no old task changed to_k: nothing to protect
    assert make_consolidator("c-lora", [old], ConsolidationWeights()).loss(cur, 0).item() == 0


def test_clora_is_zero_for_disjoint_supports():
    old = factors([[1.0, 0.0]], [[1.0], [0.0]])  # touches entry (0, 0) only
    cur = trainable(factors([[0.0, 1.0]], [[0.0], [1.0]]))  # touches entry (1, 1) only
    assert make_consolidator("c-lora", [old], ConsolidationWeights()).loss(cur, 0).item() == 0


def test_finetune_has_no_regularizer_but_merges_old_tasks():
    old = factors([[1.0, 0.0]], [[1.0], [0.0]])
    consolidator = make_consolidator("finetune", [old], ConsolidationWeights())
    assert consolidator.uses_old_in_forward
    assert consolidator.loss(trainable(old), 0).item() == 0


def test_cidm_orthogonal_matches_hand_computation():
    old = factors([[3.0, 4.0, 0.0]], [[0.0], [2.0], [0.0]])  # Â = [.6, .8, 0], B̂ = [0, 1, 0]
    cur = trainable(factors([[1.0, 1.0, 1.0]], [[1.0], [2.0], [3.0]]))
    consolidator = make_consolidator("cidm", [old], ConsolidationWeights(orthogonal=0.5, shared=0.0))
    assert not consolidator.uses_old_in_forward
    loss = consolidator.loss(cur, 0)
    # ‖A_t Âᵀ‖² = 1.4² = 1.96; ‖B̂ᵀ B_t‖² = 2² = 4
    assert loss.item() == pytest.approx(0.5 * (1.96 + 4.0))
    loss.backward()
    down, up = cur[KEY]
    assert up.grad[1, 0].item() == pytest.approx(0.5 * 2 * 2.0)  # descent shrinks B_t along the old column
    assert up.grad[0, 0].item() == 0 and up.grad[2, 0].item() == 0
    assert torch.allclose(down.grad, torch.tensor([[0.5 * 2 * 1.4 * 0.6, 0.5 * 2 * 1.4 * 0.8, 0.0]],
                                                  dtype=torch.float64))


def test_cidm_orthogonal_is_zero_for_orthogonal_factors():
    gen = torch.Generator().manual_seed(0)
    q_in, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    q_out, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))
    old = {KEY: (q_in[:, :4].T.clone(), q_out[:, :4].clone())}
    cur = {KEY: (q_in[:, 4:8].T.clone(), q_out[:, 4:8].clone())}
    consolidator = CIDMConsolidator([old], ConsolidationWeights(shared=0.0))
    assert consolidator.orthogonal_loss(cur).item() == pytest.approx(0.0, abs=1e-20)


def _random_tasks(count, out=48, rank=4, shared_dims=4, seed=0):
    """Tasks whose up factors mostly live in a common 4-d subspace, plus task-specific noise."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(out, shared_dims, generator=gen)
    return [{KEY: (torch.randn(rank, 16, generator=gen),
                   common @ torch.randn(shared_dims, rank, generator=gen) + 0.05 * torch.randn(out, rank, generator=gen))}
            for _ in range(count)]


def test_shared_basis_moves_from_zero_and_reduces_its_residual():
    tasks = _random_tasks(7)
    ups = [task[KEY][1] for task in tasks]
    basis = SharedBasis(torch.zeros(4, 48))
    start = basis.residual(ups)
    assert start == pytest.approx(sum(float((u ** 2).sum()) for u in ups), rel=1e-5)
    basis.basis = torch.randn(4, 48, generator=torch.Generator().manual_seed(1)) * 1e-3  # away from the fixed point
    residuals = []
    for _ in range(5):
        basis.refit(ups)
        residuals.append(basis.residual(ups))
    assert basis.basis.abs().sum() > 0
    assert torch.allclose(basis.basis @ basis.basis.T, torch.eye(4), atol=1e-5)
    assert residuals[-1] < 0.05 * start  # the common subspace is found
    assert all(b <= a * (1 + 1e-4) for a, b in zip(residuals, residuals[1:]))


def test_cidm_shared_basis_starts_from_old_tasks_and_its_loss_pulls_toward_it():
    tasks = _random_tasks(7)
    old, current = tasks[:6], tasks[6]
    consolidator = CIDMConsolidator(old, ConsolidationWeights(orthogonal=0.0, shared=1.0))
    basis = consolidator.shared[KEY]
    assert basis.basis.abs().sum() > 0
    everyone = [t[KEY][1] for t in tasks]
    before = basis.residual(everyone)
    cur = trainable(current)
    loss = consolidator.loss(cur, 0)  # refits S on all seven tasks
    after = basis.residual(everyone)
    assert after <= before * (1 + 1e-4)
    s = basis.basis.to(torch.float64)
    up = cur[KEY][1].detach().to(torch.float64)
    expected = ((up.T - up.T @ s.T @ s) ** 2).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    stepped = up - 0.1 * cur[KEY][1].grad
    assert ((stepped.T - stepped.T @ s.T @ s) ** 2).sum() < expected


def test_cidm_state_round_trips_and_handles_any_task_count():
    tasks = _random_tasks(10)
    consolidator = CIDMConsolidator(tasks[:9], ConsolidationWeights(shared_every=3))
    consolidator.loss(trainable(tasks[9]), 0)
    state = consolidator.state_dict()
    other = CIDMConsolidator(tasks[:9], ConsolidationWeights(shared_every=3))
    other.load_state_dict(state)
    assert torch.equal(other.shared[KEY].basis, consolidator.shared[KEY].basis)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="supported"):
        make_consolidator("ewc", [], ConsolidationWeights())
