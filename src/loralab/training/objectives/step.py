"""One batch of preference pairs through the policy and the reference: the loss and the
metrics TRL users read, under TRL's names (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies as each objective defines its rewards; logps/chosen
and logps/rejected, here always the sums over each reply).

The reference policy is the model as training started, without a second copy of it: the
base with the adapter turned off (a new adapter starts at ΔW = 0, so that is the policy
at step 0), or, for a run that starts from a trained adapter, a frozen copy of that
adapter's factors beside the one that trains (``REFERENCE_ADAPTER``, a few megabytes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ...data.batches import collate
from ...data.pairs import EncodedPair
from ...files.adapter_dir import load_adapter
from ...lora.adapters import active_adapter, disabled_adapters, set_active_adapter
from ...lora.inject import adapter_configs, lora_layers
from ...lora.layers import TrainableCopy
from ..sequence_logps import RowLogProbs, row_log_probs
from .objective import PairLogProbs, PreferenceObjective, PreferenceSettings

REFERENCE_ADAPTER = "reference"


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, Tensor]:
    """One padded batch of 2P rows: the P chosen sides, then the P rejected ones (one
    forward for both, as the losses compare them)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


@contextlib.contextmanager
def reference_policy(model: nn.Module) -> Iterator[None]:
    """The model runs as the reference policy inside the block: the frozen reference
    adapter where the run loaded one, else the base with its adapters off."""
    if REFERENCE_ADAPTER not in adapter_configs(model):
        with disabled_adapters(model):
            yield
        return
    previous = active_adapter(model)
    set_active_adapter(model, REFERENCE_ADAPTER)
    try:
        yield
    finally:
        set_active_adapter(model, previous)


def load_reference_adapter(model: nn.Module, directory: str) -> None:
    """The adapter the run started from, loaded again beside the one that trains, frozen:
    the reference policy (``REFERENCE_ADAPTER``). The trained one stays active."""
    training = active_adapter(model)
    load_adapter(model, directory, adapter_name=REFERENCE_ADAPTER)
    for layer in lora_layers(model).values():
        if REFERENCE_ADAPTER in layer.lora:
            layer.lora[REFERENCE_ADAPTER].requires_grad_(False)
    for module in model.modules():
        if isinstance(module, TrainableCopy) and REFERENCE_ADAPTER in module.copies:
            module.copies[REFERENCE_ADAPTER].requires_grad_(False)
    set_active_adapter(model, training)


def pair_log_probs(
    runner: nn.Module,
    model: nn.Module,
    batch: dict[str, Tensor],
    reference: bool,
    extra: dict | None = None,
) -> PairLogProbs:
    """The policy's log-probabilities of both sides (with grad), and the reference's
    (without) where ``reference``; ``extra`` goes to every forward (``use_cache``)."""
    inputs = {**batch, **(extra or {})}
    policy = row_log_probs(runner, model, inputs)
    chosen, rejected = _halves(policy)
    if not reference:
        return PairLogProbs(chosen, rejected)
    with torch.no_grad(), reference_policy(model):
        fixed = row_log_probs(runner, model, inputs).total
    reference_chosen, reference_rejected = fixed.chunk(2)
    return PairLogProbs(chosen, rejected, reference_chosen, reference_rejected)


def _halves(rows: RowLogProbs) -> tuple[RowLogProbs, RowLogProbs]:
    totals, tokens = rows.total.chunk(2), rows.tokens.chunk(2)
    return RowLogProbs(totals[0], tokens[0]), RowLogProbs(totals[1], tokens[1])


def preference_loss(
    runner: nn.Module,
    model: nn.Module,
    batch: dict[str, Tensor],
    objective: PreferenceObjective,
    settings: PreferenceSettings,
    extra: dict | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The batch's loss and its metrics (each a mean over the batch's pairs)."""
    pairs = pair_log_probs(runner, model, batch, objective.uses_reference, extra)
    result = objective.loss(pairs, settings)
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    metrics = {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": pairs.chosen.total.detach().mean().item(),
        "logps/rejected": pairs.rejected.total.detach().mean().item(),
    }
    return result.loss, metrics
