"""DPO (Rafailov et al., 2023, Eq. 7): −log σ(β·[(log π(y_w) − log π_ref(y_w)) −
(log π(y_l) − log π_ref(y_l))]) over sums of the replies' token log-probabilities. At the
start the policy is the reference, so every pair's loss is ln 2."""

from __future__ import annotations

import torch.nn.functional as F

from .objective import PairLogProbs, PreferenceLoss, PreferenceSettings


def log_ratios(pairs: PairLogProbs):
    """log π/π_ref of the chosen and of the rejected replies (sums over their tokens)."""
    return (
        pairs.chosen.total - pairs.reference_chosen,
        pairs.rejected.total - pairs.reference_rejected,
    )


class Dpo:
    name = "dpo"
    summary = "DPO: −log σ(β·Δ log-ratio to the reference), Rafailov et al. 2023"
    uses_reference = True
    default_beta = 0.1

    def loss(self, pairs: PairLogProbs, settings: PreferenceSettings) -> PreferenceLoss:
        chosen, rejected = log_ratios(pairs)
        losses = -F.logsigmoid(settings.beta * (chosen - rejected))
        beta = settings.beta
        return PreferenceLoss(losses.mean(), beta * chosen.detach(), beta * rejected.detach())
