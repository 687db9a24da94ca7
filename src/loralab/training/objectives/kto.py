"""KTO (Ethayarajh et al., 2024, Eq. 7-8): a loss per completion rather than per pair, so
that data of single completions marked desirable or not trains too. A desirable
completion's loss is 1 − σ(β·(log π/π_ref − z₀)), an undesirable one's 1 − σ(β·(z₀ −
log π/π_ref)), weighted by ``desirable_weight`` and ``undesirable_weight``; z₀ estimates
KL(π ‖ π_ref) from mismatched pairs: each prompt of the batch followed by the previous
example's completion (TRL's rotation by one), max(0, mean log π/π_ref), no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...data.batches import collate
from ...data.encoding import IGNORE_INDEX, Encoded
from ...data.pairs import EncodedCompletion
from ..sequence_logps import row_log_probs
from .step import reference_policy


@dataclass(frozen=True)
class KtoSettings:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def kto_losses(
    desirable_logratios: Tensor,
    undesirable_logratios: Tensor,
    kl: Tensor,
    settings: KtoSettings,
) -> Tensor:
    """Each completion's weighted loss (the desirable ones first)."""
    beta = settings.beta
    desirable = 1 - torch.sigmoid(beta * (desirable_logratios - kl))
    undesirable = 1 - torch.sigmoid(beta * (kl - undesirable_logratios))
    return torch.cat(
        [settings.desirable_weight * desirable, settings.undesirable_weight * undesirable]
    )


def _rows(examples: list[EncodedCompletion], completions: list[list[int]], limit: int):
    items = []
    for example, completion in zip(examples, completions, strict=True):
        ids = (example.prompt + completion)[:limit]
        labels = ([IGNORE_INDEX] * len(example.prompt) + completion)[:limit]
        items.append(Encoded(ids, labels))
    return items


def kto_loss(
    runner: nn.Module,
    model: nn.Module,
    examples: list[EncodedCompletion],
    pad_id: int,
    settings: KtoSettings,
    max_length: int,
    device: torch.device,
    extra: dict | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of a batch of completions (the mean over them) and TRL's metrics."""
    completions = [e.completion for e in examples]
    rotated = completions[-1:] + completions[:-1]  # prompt i with completion i − 1
    batch = _on(collate(_rows(examples, completions, max_length), pad_id), device, extra)
    mismatched = _on(collate(_rows(examples, rotated, max_length), pad_id), device, extra)
    policy = row_log_probs(runner, model, batch).total
    with torch.no_grad():
        kl_policy = row_log_probs(runner, model, mismatched).total
        with reference_policy(model):
            reference = row_log_probs(runner, model, batch).total
            kl_reference = row_log_probs(runner, model, mismatched).total
    kl = (kl_policy - kl_reference).mean().clamp(min=0)
    desirable = torch.tensor([e.desirable for e in examples], device=policy.device)
    logratios = policy - reference
    losses = kto_losses(logratios[desirable], logratios[~desirable], kl, settings)
    rewards = settings.beta * logratios.detach()
    metrics = {"kl": float(kl)}
    if desirable.any():
        metrics["rewards/chosen"] = float(rewards[desirable].mean())
        metrics["logps/chosen"] = float(policy.detach()[desirable].mean())
    if (~desirable).any():
        metrics["rewards/rejected"] = float(rewards[~desirable].mean())
        metrics["logps/rejected"] = float(policy.detach()[~desirable].mean())
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.nanmean(), metrics


def _on(batch: dict[str, Tensor], device: torch.device, extra: dict | None) -> dict:
    return {**{k: v.to(device) for k, v in batch.items()}, **(extra or {})}
