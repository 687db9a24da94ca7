"""Choosing each row's next token: greedy, or sampled at a temperature from the smallest
set of tokens whose probability reaches top-p, each row with its own settings and its own
seed. ``choose`` is a pure function of tensors (the random number each row draws comes
in as an input); ``RowSampling`` keeps a row's generator outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RowSampling:
    """One row's settings: ``temperature`` 0 is greedy; ``top_p`` 1 keeps every token;
    ``seed`` fixes the row's draws (None: drawn from PyTorch's global generator)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def draw(self) -> float:
        """The row's next uniform number in [0, 1) (0 for a greedy row: nothing drawn)."""
        if self.temperature == 0:
            return 0.0
        return float(torch.rand((), generator=self.generator))


HEAD_TOKENS = 256  # the most likely tokens a sampled row looks at before the whole vocabulary


def choose(logits: Tensor, temperature: Tensor, top_p: Tensor, uniform: Tensor) -> Tensor:
    """Each row's next token from ``logits`` (R, V): the argmax where ``temperature`` (R,)
    is 0, else the token at ``uniform`` (R,) on the cumulative distribution of the
    tempered probabilities cut to the top-p nucleus (most likely first). Each row's token
    depends on its own inputs alone.

    Sorting the vocabulary is what sampling costs (at 32 sampled rows of SmolLM2 it took
    as long as the step's head): the draw is looked for first among the row's
    ``HEAD_TOKENS`` most likely tokens (a partial sort), which hold it whenever the
    nucleus ends there, or it is the whole vocabulary and the draw lands there; only the
    other rows sort in full."""
    chosen = logits.argmax(-1)
    hot = (temperature > 0).nonzero().flatten()
    if hot.numel() == 0:
        return chosen
    logits, temperature, top_p, uniform = logits[hot], temperature[hot], top_p[hot], uniform[hot]
    probabilities = (logits.float() / temperature[:, None]).softmax(-1)
    head = min(HEAD_TOKENS, probabilities.shape[-1])
    top, order = probabilities.topk(head, dim=-1)  # most likely first
    before = top.cumsum(-1) - top  # mass of the more likely tokens
    cumulative = (top * (before < top_p[:, None])).cumsum(-1)  # the nucleus, within the head
    closed = before[:, -1] + top[:, -1] >= top_p  # the nucleus ends within the head
    # Otherwise a nucleus of the whole vocabulary (top-p 1) still has a known mass; one cut
    # somewhere in the tail needs the tail's order, so such rows sort in full.
    total = torch.where(closed, cumulative[:, -1], probabilities.sum(-1))
    target = uniform * total
    index = torch.searchsorted(cumulative, target[:, None]).clamp_max(head - 1)
    picked = order.gather(-1, index).squeeze(-1)
    beyond = (top_p < 1) | (target > cumulative[:, -1])
    rest = (~closed & beyond).nonzero().flatten()
    if rest.numel():
        picked[rest] = _from_sorted(probabilities[rest], top_p[rest], uniform[rest])
    return chosen.index_copy(0, hot, picked)


def _from_sorted(probabilities: Tensor, top_p: Tensor, uniform: Tensor) -> Tensor:
    """The draw on the whole vocabulary sorted by probability (rows the head did not hold)."""
    probabilities, order = probabilities.sort(-1, descending=True)
    before = probabilities.cumsum(-1) - probabilities
    nucleus = probabilities * (before < top_p[:, None])  # the most likely is always in
    cumulative = nucleus.cumsum(-1)
    target = uniform[:, None] * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, target).clamp_max(probabilities.shape[-1] - 1)
    return order.gather(-1, index).squeeze(-1)
