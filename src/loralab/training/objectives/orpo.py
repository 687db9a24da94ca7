"""ORPO (Hong et al., 2024, Eq. 6): the chosen reply's NLL plus λ·(−log σ(log odds ratio)),
odds(y) = p/(1 − p) with p the reply's average token probability; no reference policy, and
no SFT beforehand. The NLL is the mean over the chosen replies' tokens (the paper's
L_SFT; TRL's ORPOTrainer counts the prompt's tokens in it too)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .objective import PairLogProbs, PreferenceLoss, PreferenceSettings


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, by whichever form keeps its digits (Mächler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen: Tensor, rejected: Tensor) -> Tensor:
    """log(odds(y_w)/odds(y_l)) from the average log-probabilities of the two replies."""
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


class Orpo:
    name = "orpo"
    summary = "ORPO: NLL(y_w) − λ·log σ(log odds ratio), no reference, Hong et al. 2024"
    uses_reference = False
    default_beta = 0.1  # λ

    def loss(self, pairs: PairLogProbs, settings: PreferenceSettings) -> PreferenceLoss:
        chosen, rejected = pairs.chosen.mean, pairs.rejected.mean
        nll = -pairs.chosen.total.sum() / pairs.chosen.tokens.sum().clamp(min=1)
        odds = F.logsigmoid(log_odds_ratio(chosen, rejected))
        beta = settings.beta
        loss = nll - beta * odds.mean()
        return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())
