"""SimPO (Meng et al., 2024, Eq. 6): −log σ(β·(mean log π(y_w) − mean log π(y_l)) − γ),
with no reference policy: the reward is the reply's average token log-probability, and γ
is the margin it must win by."""

from __future__ import annotations

import torch.nn.functional as F

from .objective import PairLogProbs, PreferenceLoss, PreferenceSettings


class Simpo:
    name = "simpo"
    summary = "SimPO: −log σ(β·Δ mean log-prob − γ), no reference, Meng et al. 2024"
    uses_reference = False
    default_beta = 2.0  # the paper's range is 2.0-2.5 (TRL's CPO default of 0.1 is CPO's)

    def loss(self, pairs: PairLogProbs, settings: PreferenceSettings) -> PreferenceLoss:
        chosen, rejected = pairs.chosen.mean, pairs.rejected.mean
        losses = -F.logsigmoid(settings.beta * (chosen - rejected) - settings.simpo_gamma)
        beta = settings.beta
        return PreferenceLoss(losses.mean(), beta * chosen.detach(), beta * rejected.detach())
