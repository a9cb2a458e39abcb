"""Consolidation regularizers: what keeps task t from overwriting what tasks < t learned.

Notation, per LoRA'd projection (layer l, projection f): task j has down A_j ∈ R^{r×in} and up B_j ∈ R^{out×r};
its weight update is ΔW_j = B_j A_j. Task t is being trained; tasks j < t are frozen. Every loss is averaged over
the (l, f) pairs so its size does not depend on how many layers a model has.

* ``cidm`` (the paper's intent, made to work)
    task-specific:  L_orth   = mean_{l,f} Σ_{j<t} ( ‖A_t Â_jᵀ‖_F² + ‖B̂_jᵀ B_t‖_F² ),   X̂ = X / ‖X‖_F
        r×r products: zero exactly when the new task's input rows and output columns are orthogonal to every
        old task's, so ΔW_t neither reads nor writes the old tasks' subspaces. (The released code's B_t B_kᵀ is
        out×out and is zero only in degenerate cases.)
    task-shared:    L_shared = mean_{l,f} ‖B_tᵀ − M_t S‖_F²
        S ∈ R^{k×out} (orthonormal rows) is a basis shared by all tasks, M_j ∈ R^{r×k} the per-task affine map.
        S is refit in closed form every ``shared_every`` steps by alternating ridge least squares over every
        task's B_jᵀ ≈ M_j S (old tasks plus the detached current one), starting from the top-k right singular
        vectors of the stacked old B_jᵀ. The released LagrangeTerm started S at 0, where its pseudo-inverse
        updates leave it at 0 forever, and was hard-coded to 5 tasks; this version has neither problem.
    L = orthogonal · L_orth + shared · L_shared. With no old task, L = 0.
* ``cidm-official``: the released code, for reproduction:
    L = official · mean_{j,l,f} mean|B_t B_jᵀ| + official · mean_{l,f} mean((B_t − 1)²)   (t ≥ 2 only).
* ``c-lora`` (Smith et al., "Continual Diffusion: Continual Customization of Text-to-Image Diffusion with C-LoRA",
  arXiv 2304.06027, §4): the earlier tasks' updates are merged into the weights (in the forward pass, at weight
  1), and the new update is self-regularised wherever their sum M = Σ_{j<t} B_j A_j already changed the weights:
      paper:  L = λ · Σ_{l,f} ‖M ⊙ (B_t A_t)‖_F²
      here:   L = clora · mean_{(l,f): M≠0} mean((M ⊙ B_t A_t)²) / mean(M²)²
  i.e. the paper's penalty with both factors measured in units of the old updates' RMS, per projection: scaling
  every weight by s leaves L unchanged (the paper's grows as s⁴, which made one λ learn nothing after task 1 at
  one learning rate and forget at another), and it does not grow with the matrices' size. Only the cross-
  attention key and value projections are trained, as in the paper (after Custom Diffusion); concept tokens start
  random and prompts leave the class word out (``class_word_in_prompt``). Degenerate case: M is dense (a sum of
  products of dense factors), so "where M ≠ 0" is everywhere and the penalty's only zero is B_t A_t = 0; it acts
  as a weighted weight decay toward no update, which DCS (arXiv 2410.00700) calls C-LoRA's collapse toward zero.
* ``finetune``: no regularizer, old tasks merged in the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import TaskFactors
from .layers import PROJECTIONS

METHODS = ("cidm", "cidm-official", "c-lora", "finetune")
RIDGE = 1e-6  # keeps the closed-form solves well posed when a task's factors are (still) zero


@dataclass
class ConsolidationWeights:
    orthogonal: float = 0.1
    shared: float = 0.01
    shared_rank: int | None = None  # k; None: the LoRA rank
    shared_every: int = 1
    official: float = 0.1
    clora: float = 1.0  # normalised λ (see the module docstring)


class Consolidator:
    """No regularizer; the base of the others. Class attributes say how a method trains: whether old tasks take
    part in the forward pass, whether prompts keep the class word (and tokens 2.. start from it), and which
    projections' factors are trained (the others stay at their zero update)."""

    uses_old_in_forward = False
    class_word_in_prompt = True
    trained_projections: tuple[str, ...] = PROJECTIONS

    def __init__(self, old_tasks: list[TaskFactors], weights: ConsolidationWeights):
        self.old_tasks, self.weights = old_tasks, weights

    def loss(self, current: TaskFactors, step: int) -> torch.Tensor:
        return torch.zeros(())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state  # stateless


class FinetuneConsolidator(Consolidator):
    uses_old_in_forward = True


class OfficialConsolidator(Consolidator):
    def loss(self, current: TaskFactors, step: int) -> torch.Tensor:
        if not self.old_tasks:
            return torch.zeros(())
        orth, enhance = [], []
        for key, (_, up) in current.items():
            enhance.append(((up - 1) ** 2).mean())
            orth += [(up @ old[key][1].to(up).T).abs().mean() for old in self.old_tasks]
        return self.weights.official * (torch.stack(orth).mean() + torch.stack(enhance).mean())


class CLoRAConsolidator(Consolidator):
    uses_old_in_forward = True
    class_word_in_prompt = False
    trained_projections = ("to_k", "to_v")

    def __init__(self, old_tasks: list[TaskFactors], weights: ConsolidationWeights):
        super().__init__(old_tasks, weights)
        # M = Σ_j B_j A_j never changes during the task, so it is summed once; projections that no old task
        # changed (M = 0) have nothing to protect.
        merged = {key: sum(old[key][1] @ old[key][0] for old in old_tasks) for key in old_tasks[0]} \
            if old_tasks else {}
        self.merged = {key: m for key, m in merged.items() if key[1] in self.trained_projections and m.any()}
        self.mean_square = {key: (m.double() ** 2).mean().item() for key, m in self.merged.items()}

    def loss(self, current: TaskFactors, step: int) -> torch.Tensor:
        if not self.merged:
            return torch.zeros(())
        terms = [((self.merged[key].to(up) * (up @ down)) ** 2).mean() / self.mean_square[key] ** 2
                 for key, (down, up) in current.items() if key in self.merged]
        return self.weights.clora * torch.stack(terms).mean()


class SharedBasis:
    """One projection's shared basis S [k, out] with orthonormal rows, fit to tasks' B_jᵀ ≈ M_j S."""

    def __init__(self, basis: torch.Tensor):
        self.basis = basis

    @classmethod
    def from_tasks(cls, ups: list[torch.Tensor], rank: int) -> "SharedBasis":
        stacked = torch.cat([up.T for up in ups]).float()  # [Σr, out]
        _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
        return cls(vh[:rank].clone())

    def maps(self, ups: list[torch.Tensor]) -> list[torch.Tensor]:
        """M_j = B_jᵀ Sᵀ (S Sᵀ + ρI)⁻¹: each task's least-squares coefficients on the basis."""
        gram = self.basis @ self.basis.T + RIDGE * torch.eye(len(self.basis))
        return [torch.linalg.solve(gram, self.basis @ up.float()).T for up in ups]

    def residual(self, ups: list[torch.Tensor]) -> float:
        return sum(float(((up.T.float() - m @ self.basis) ** 2).sum()) for up, m in zip(ups, self.maps(ups)))

    def refit(self, ups: list[torch.Tensor]) -> None:
        """One alternating step: maps for fixed S, then S = (Σ MᵀM + ρI)⁻¹ Σ Mᵀ B_jᵀ, then re-orthonormalised."""
        maps = self.maps(ups)
        lhs = sum(m.T @ m for m in maps) + RIDGE * torch.eye(self.basis.shape[0])
        rhs = sum(m.T @ up.T.float() for m, up in zip(maps, ups))
        solved = torch.linalg.solve(lhs, rhs)
        q, _ = torch.linalg.qr(solved.T)  # orthonormal rows span the same space; the maps absorb the change
        self.basis = q.T.contiguous()


class CIDMConsolidator(Consolidator):
    def __init__(self, old_tasks: list[TaskFactors], weights: ConsolidationWeights):
        super().__init__(old_tasks, weights)
        self.normalized = [{key: (down / down.norm().clamp_min(1e-12), up / up.norm().clamp_min(1e-12))
                            for key, (down, up) in old.items()} for old in old_tasks]
        self.shared: dict[tuple[int, str], SharedBasis] = {}
        if old_tasks and weights.shared > 0:
            for key, (_, up) in old_tasks[0].items():
                rank = weights.shared_rank or up.shape[1]
                self.shared[key] = SharedBasis.from_tasks([old[key][1] for old in old_tasks], rank)

    def orthogonal_loss(self, current: TaskFactors) -> torch.Tensor:
        terms = []
        for key, (down, up) in current.items():
            for old in self.normalized:
                old_down, old_up = old[key][0].to(down), old[key][1].to(up)
                terms.append(((down @ old_down.T) ** 2).sum() + ((old_up.T @ up) ** 2).sum())
        return torch.stack(terms).sum() / len(current)

    def shared_loss(self, current: TaskFactors, step: int) -> torch.Tensor:
        every = max(1, self.weights.shared_every)
        terms = []
        for key, (_, up) in current.items():
            basis = self.shared[key]
            if step % every == 0:
                basis.refit([old[key][1] for old in self.old_tasks] + [up.detach()])
            s = basis.basis.to(up)
            coefficients = up.T @ s.T  # S has orthonormal rows, so the ridge solve reduces to a projection
            terms.append(((up.T - coefficients @ s) ** 2).sum())
        return torch.stack(terms).sum() / len(current)

    def loss(self, current: TaskFactors, step: int) -> torch.Tensor:
        if not self.old_tasks:
            return torch.zeros(())
        total = self.weights.orthogonal * self.orthogonal_loss(current)
        if self.shared:
            total = total + self.weights.shared * self.shared_loss(current, step)
        return total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shared.{layer}.{proj}": basis.basis.clone() for (layer, proj), basis in self.shared.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for (layer, proj), basis in self.shared.items():
            saved = state.get(f"shared.{layer}.{proj}")
            if saved is not None:
                basis.basis = saved.clone()


CONSOLIDATORS = {"cidm": CIDMConsolidator, "cidm-official": OfficialConsolidator, "c-lora": CLoRAConsolidator,
                 "finetune": FinetuneConsolidator}


def make_consolidator(method: str, old_tasks: list[TaskFactors], weights: ConsolidationWeights) -> Consolidator:
    """The regularizer of `method` (a METHODS entry) against the frozen factors of `old_tasks`.

    Raises:
        ValueError: for an unknown method (the nodes check the method against METHODS first).
    """
    if method not in CONSOLIDATORS:
        raise ValueError(f"unknown consolidation method {method!r}; supported: {', '.join(METHODS)}")
    return CONSOLIDATORS[method](old_tasks, weights)
