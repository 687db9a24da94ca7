"""What a preference objective is: a loss over the log-probabilities a batch of pairs gets
from the policy (and from the reference policy, where the objective has one).

An objective sees only ``PairLogProbs``; running the model, the reference and the
metrics is ``step.py``'s, so each objective is its formula and nothing else, and a test
can hold it against TRL's on the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ..sequence_logps import RowLogProbs


@dataclass(frozen=True)
class PreferenceSettings:
    """The hyperparameters of the preference objectives."""

    beta: float
    """DPO's, IPO's and SimPO's β (IPO's τ), ORPO's λ: the objective's own default where
    the run gives none."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ."""


@dataclass
class PairLogProbs:
    """A batch of pairs: the policy's log-probabilities of each side (with grad), and the
    reference policy's sums (None for an objective without a reference)."""

    chosen: RowLogProbs
    rejected: RowLogProbs
    reference_chosen: Tensor | None = None  # (P,)
    reference_rejected: Tensor | None = None


@dataclass
class PreferenceLoss:
    """What an objective gives for a batch: the loss to minimise (a scalar) and the
    implicit rewards of each side that TRL logs (detached)."""

    loss: Tensor
    chosen_rewards: Tensor  # (P,)
    rejected_rewards: Tensor  # (P,)


class PreferenceObjective(Protocol):
    name: str
    """The name on the command line (``--objective``)."""
    summary: str
    uses_reference: bool
    """Whether the loss compares with a reference policy (the model at the start)."""
    default_beta: float

    def loss(self, pairs: PairLogProbs, settings: PreferenceSettings) -> PreferenceLoss:
        """The batch's loss (the mean over its pairs) from the log-probabilities."""
