"""The next token of one request: greedy at temperature 0, else sampled (top-p, seeded)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """OpenAI's sampling fields, checked by the request parser."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


# Below this a temperature is greedy: dividing by it would overflow the softmax (vLLM
# draws the same line).
GREEDY_BELOW = 1e-5


class Sampler:
    """One request's draws; with a seed they repeat whatever else is in the batch, since
    the request has its own generator."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.generator: torch.Generator | None = None
        if sampling.temperature >= GREEDY_BELOW:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            # any integer a client sends is a valid seed; torch takes [0, 2**64)
            self.generator = torch.Generator().manual_seed(seed % 2**64)

    def __call__(self, logits: Tensor) -> int:
        """The next token id from one row of logits (vocab,)."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the most likely tokens up to top_p of the mass (always the first one)
            drop = sorted_probs.cumsum(0) - sorted_probs >= self.sampling.top_p
            drop[0] = False  # a top_p that is 0 in float32 (1e-46) must still keep one
            sorted_probs[drop] = 0.0
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))
