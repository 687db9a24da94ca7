"""AdaLoRA's budget: importance of each singular triplet, the cubic schedule of the total
rank, the allocation that masks the least important triplets, and the orthogonality
regulariser (AdaLoRA, Sec. 3.2–3.3).

Importance (Eq. 8–11): the sensitivity of a parameter is ``s = |θ · ∂L/∂θ|``; it is
smoothed, ``Ī ← β1 Ī + (1 − β1) s``, its uncertainty tracked, ``Ū ← β2 Ū + (1 − β2) |s − Ī|``,
and the score is ``Ī · Ū``. A triplet i scores ``S(Λ_i) + mean_j S(P_ji) + mean_j S(Q_ij)``.

Schedule (Eq. 12, as the authors' code and PEFT floor it): with b0 = Σ init_r and
bT = target_r × matrices, the total budget is b0 for step ≤ tinit, bT for step >
total_step − tfinal, and in between ``⌊bT + (b0 − bT)(1 − (t − tinit)/(T − tfinal −
tinit))³⌋``. Every ``deltaT`` steps of that middle phase the ``budget`` best triplets across
all matrices keep their Λ and the rest are set to zero (they may regrow and come back at the
next allocation, as in the paper). At step T − tfinal the final allocation is made with
bT; after it the mask is fixed and re-applied after every step.

Two small departures from PEFT's ``RankAllocator``, both deliberate: the scores are also
updated at step T − tfinal, so the final allocation sees that step's gradients; and
exactly ``budget`` triplets are kept, where PEFT masks every score ≤ the k-th smallest and
so prunes more than the budget when scores tie (all of them are 0 before Λ has moved).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ...lora.config import ConfigError
from .config import AdaLoraConfig, check_schedule


class Triplets(Protocol):
    """What the budget reads of one matrix (``adalora.SvdFactors``)."""

    P: Tensor  # (out, r)
    E: Tensor  # (r,)
    Q: Tensor  # (r, in)
    mask: Tensor  # (r,) bool


def rank_budget(
    step: int, initial: int, target: int, tinit: int, tfinal: int, total_step: int
) -> int:
    """The total number of triplets kept after optimizer step ``step`` (counted from 1)."""
    if step <= tinit:
        return initial
    if step > total_step - tfinal:
        return target
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int((initial - target) * (1 - progress) ** 3 + target)


def triplet_scores(
    factors: Mapping[str, Triplets], sensitivity: dict[str, Tensor], uncertainty: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Each matrix's triplet scores (r,), from the smoothed ``Ī`` and ``Ū`` of P, Λ and Q."""
    scores = {}
    for name in factors:
        score = {
            part: sensitivity[f"{name}.{part}"] * uncertainty[f"{name}.{part}"] for part in "PEQ"
        }
        # Λ_i, plus the mean over P's column i and over Q's row i (Eq. 10).
        scores[name] = score["E"] + score["P"].mean(dim=0) + score["Q"].mean(dim=1)
    return scores


def keep_best(scores: Mapping[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Masks (r,) that keep exactly the ``budget`` highest scores across every matrix.

    Ties are broken by order (matrices as given, then triplet index), so the number kept is
    exact even when many scores are equal (all zero before any gradient, say).
    """
    names = list(scores)
    flat = torch.cat([scores[n].float().flatten().cpu() for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep[order[: max(0, budget)]] = True
    masks, start = {}, 0
    for name in names:
        count = scores[name].numel()
        masks[name] = keep[start : start + count].to(scores[name].device)
        start += count
    return masks


def apply_masks(factors: Mapping[str, Triplets]) -> None:
    """Set every masked Λ_i to zero (P and Q stay, so a triplet can come back)."""
    with torch.no_grad():
        for f in factors.values():
            f.E.masked_fill_(~f.mask, 0.0)


def orthogonality(factors: Mapping[str, Triplets]) -> Tensor:
    """The mean over every P and every Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F.

    The paper writes R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (Eq. 4); the authors' code and
    PEFT add the unsquared norms and divide by the number of matrices, which is what γ
    (``orth_reg_weight``) is tuned for in their configs, so that form is used here: a γ
    read from a PEFT file means the same thing. Masked triplets count too, as in PEFT.
    """
    terms = []
    for f in factors.values():
        identity = torch.eye(f.E.shape[0], device=f.P.device, dtype=f.P.dtype)
        terms.append(torch.linalg.matrix_norm(f.P.T @ f.P - identity))  # (r, r)
        terms.append(torch.linalg.matrix_norm(f.Q @ f.Q.T - identity))  # (r, r)
    return torch.stack(terms).mean()


@dataclass
class RankAllocator:
    """The running importance scores and schedule of one model's AdaLoRA."""

    config: AdaLoraConfig
    sensitivity: dict[str, Tensor] = field(default_factory=dict)
    """Ī, by ``<module>.P`` / ``.E`` / ``.Q``."""
    uncertainty: dict[str, Tensor] = field(default_factory=dict)
    """Ū, by the same names."""
    allocations: int = 0
    """How many times the budget was allocated (0: every triplet still kept)."""
    schedule_length: int | None = None
    """The ``total_step`` the schedule ran with, once training has started."""

    def total_step(self, max_steps: int) -> int:
        """The schedule's length: ``config.total_step``, or the run's ``max_steps``."""
        total = self.config.total_step if self.config.total_step is not None else max_steps
        check_schedule(self.config, total)
        self.schedule_length = total
        return total

    def budgets(self, factors: Mapping[str, Triplets]) -> tuple[int, int]:
        """The initial and the target total rank: Σ init_r and target_r × matrices."""
        return sum(f.E.shape[0] for f in factors.values()), self.config.target_r * len(factors)

    def regularizer(self, factors: Mapping[str, Triplets]) -> Tensor | None:
        if self.config.orth_reg_weight == 0 or not factors:
            return None
        return self.config.orth_reg_weight * orthogonality(factors)

    def update_importance(self, factors: Mapping[str, Triplets]) -> None:
        """Fold this step's sensitivities ``|θ · ∂L/∂θ|`` into Ī and Ū (Eq. 8–9)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for name, f in factors.items():
                for part in "PEQ":
                    parameter = getattr(f, part)
                    key = f"{name}.{part}"
                    if key not in self.sensitivity:
                        self.sensitivity[key] = torch.zeros_like(parameter, dtype=torch.float32)
                        self.uncertainty[key] = torch.zeros_like(parameter, dtype=torch.float32)
                    if parameter.grad is None:
                        sensitivity = torch.zeros_like(self.sensitivity[key])
                    else:
                        sensitivity = (parameter.float() * parameter.grad.float()).abs()
                    smoothed = self.sensitivity[key].mul_(beta1).add_((1 - beta1) * sensitivity)
                    self.uncertainty[key].mul_(beta2).add_(
                        (1 - beta2) * (sensitivity - smoothed).abs()
                    )

    def allocate(self, factors: Mapping[str, Triplets], budget: int) -> None:
        """Keep the ``budget`` most important triplets across all matrices; zero the rest."""
        for key, parameter in (
            (f"{n}.{part}", getattr(f, part)) for n, f in factors.items() for part in "PEQ"
        ):
            if key not in self.sensitivity:  # no gradient seen yet: every score is 0
                self.sensitivity[key] = torch.zeros_like(parameter, dtype=torch.float32)
                self.uncertainty[key] = torch.zeros_like(parameter, dtype=torch.float32)
        masks = keep_best(triplet_scores(factors, self.sensitivity, self.uncertainty), budget)
        for name, f in factors.items():
            f.mask.copy_(masks[name])
        apply_masks(factors)
        self.allocations += 1

    def after_step(self, factors: Mapping[str, Triplets], step: int, max_steps: int) -> None:
        """The hook: run after optimizer step ``step`` (from 1), gradients still present."""
        if not factors:
            raise ConfigError("the model has no AdaLoRA matrices (merged or unloaded?)")
        total = self.total_step(max_steps)
        final_step = total - self.config.tfinal
        if step <= final_step:
            self.update_importance(factors)
        if step <= self.config.tinit:
            return
        if step < final_step:
            if step % self.config.deltaT == 0:
                initial, target = self.budgets(factors)
                budget = rank_budget(
                    step, initial, target, self.config.tinit, self.config.tfinal, total
                )
                self.allocate(factors, budget)
        elif step == final_step:
            self.allocate(factors, self.budgets(factors)[1])
        else:  # the final phase: the ranks stay as allocated, masked Λ stay zero
            apply_masks(factors)
