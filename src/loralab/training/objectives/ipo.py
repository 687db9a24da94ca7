"""IPO (Azar et al., 2023, Eq. 17): (Δ − 1/(2τ))², a squared loss that keeps the margin
of log-ratios near 1/(2τ) instead of pushing it without bound. Each reply's log-ratio is
averaged over its tokens, as TRL does with the IPO authors' agreement (the paper's
results use this form)."""

from __future__ import annotations

from .dpo import log_ratios
from .objective import PairLogProbs, PreferenceLoss, PreferenceSettings


class Ipo:
    name = "ipo"
    summary = "IPO: (Δ mean log-ratio − 1/(2τ))², Azar et al. 2023; --beta is τ"
    uses_reference = True
    default_beta = 0.1

    def loss(self, pairs: PairLogProbs, settings: PreferenceSettings) -> PreferenceLoss:
        chosen, rejected = log_ratios(pairs)
        chosen_tokens, rejected_tokens = pairs.chosen.tokens, pairs.rejected.tokens
        per_token = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * settings.beta)) ** 2
        beta = settings.beta
        return PreferenceLoss(losses.mean(), beta * chosen.detach(), beta * rejected.detach())
