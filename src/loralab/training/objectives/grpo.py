"""GRPO (Shao et al., 2024, DeepSeekMath): a policy gradient with no value model. Each
prompt gets G sampled completions; a completion's advantage is its reward against its
group's, Â_i = (r_i − mean(r)) / (std(r) + 10⁻⁴); every token of it gets the clipped
surrogate −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â), ρ = π(token) / π_old(token),
plus β·ρ·KL(π ‖ π_ref) where β > 0 (the k3 estimator, exp(q − p) − (q − p) − 1, weighted
by the ratio as TRL does by default).

The per-token losses are then aggregated as TRL offers (``LOSS_TYPES``); ``dapo`` (TRL's
default, the DAPO paper's) divides the sum over every completion token of the batch by
their count, so a long completion weighs no less per token than a short one.

A completion whose reward could not be computed (the reward raised, or gave NaN) has a
NaN reward: its group's mean and std leave it out and its advantage is 0, so it moves
nothing; the run counts it (``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
REWARD_SCALES = ("group", "batch", "none")
STD_FLOOR = 1e-4  # TRL's: a group whose rewards are all equal gets advantages of 0


@dataclass(frozen=True)
class GrpoSettings:
    """The hyperparameters of GRPO's loss."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    """The KL penalty's weight (TRL's default: 0, no reference forward)."""
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_completion_length: int = 64
    """``dr_grpo`` divides by it: the constant of the Dr. GRPO paper."""


def nan_std(values: Tensor, dim: int | None = None) -> Tensor:
    """The sample standard deviation (Bessel's correction) of the values that are not NaN;
    NaN where fewer than two are."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    squares = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True)
    variance = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.nan)
    out = variance.sqrt()
    return out.squeeze(dim) if dim is not None else out.reshape(())


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Each completion's reward against its group's (rewards (N,) in groups of
    ``group_size`` consecutive completions); NaN rewards are left out and get 0."""
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = grouped - mean
    if scale == "group":
        std = nan_std(grouped, dim=1).unsqueeze(1) if group_size > 1 else torch.zeros_like(mean)
        advantages = advantages / (std + STD_FLOOR)
    elif scale == "batch":
        std = nan_std(rewards) if rewards.numel() > 1 else torch.zeros(())
        advantages = advantages / (std + STD_FLOOR)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: GrpoSettings,
    reference_logps: Tensor | None = None,
    tokens_in_batch: Tensor | float | None = None,
) -> Tensor:
    """The loss of a batch of completions: ``logps`` (B, T) their tokens' log-probabilities
    under the policy (with grad), ``old_logps`` under the policy that sampled them,
    ``advantages`` (B,), ``mask`` (B, T) 1 on completion tokens. ``tokens_in_batch``:
    ``dapo``'s divisor, the completion tokens of the whole step (all its micro-batches),
    by default this batch's."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    advantage = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    if settings.beta:
        if reference_logps is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        gap = reference_logps - logps
        # × ρ: the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's default since 1.x),
        # which changes the gradient even on-policy, where ρ = 1 in value only.
        per_token = per_token + settings.beta * (torch.exp(gap) - gap - 1) * ratio
    mask = mask.to(per_token.dtype)
    if settings.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if settings.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if settings.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * settings.max_completion_length)
    if settings.loss_type == "dapo":
        divisor = mask.sum() if tokens_in_batch is None else torch.as_tensor(tokens_in_batch)
        return (per_token * mask).sum() / divisor.clamp(min=1.0)
    raise ValueError(
        f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {settings.loss_type!r}"
    )


def clip_fractions(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, settings: GrpoSettings
) -> dict[str, float]:
    """The share of completion tokens whose ratio the clip held (TRL's clip_ratio/*)."""
    ratio = torch.exp(logps.detach() - old_logps)
    advantage = advantages.unsqueeze(1)
    low = (ratio < 1 - settings.epsilon_low) & (advantage < 0)
    high = (ratio > 1 + settings.epsilon_high) & (advantage > 0)
    tokens = mask.sum().clamp(min=1)
    return {
        "clip_ratio/low_mean": float((low * mask).sum() / tokens),
        "clip_ratio/high_mean": float((high * mask).sum() / tokens),
    }
