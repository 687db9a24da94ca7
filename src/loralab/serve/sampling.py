"""The next token of each request: greedy at temperature 0, else sampled (top-p, seeded).

The draw is the engine's (``engine.sampling.choose``): each row's uniform number, from
the request's own generator, placed on the cumulative distribution of its nucleus, most
likely token first. So a seeded request samples what loralab's engine samples with that
seed (GRPO's local rollouts), and a step samples all its rows in one call (a
``torch.multinomial`` a row had cost 1.6 ms at SmolLM2's vocabulary, 51 ms a step of 32
rows on a 2-core CPU).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine.sampling import choose


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
        self.temperature = sampling.temperature if sampling.temperature >= GREEDY_BELOW else 0.0
        self.generator: torch.Generator | None = None
        if self.temperature:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            # any integer a client sends is a valid seed; torch takes [0, 2**64)
            self.generator = torch.Generator().manual_seed(seed % 2**64)

    def draw(self) -> float:
        """The request's next uniform number in [0, 1) (0 when greedy: nothing drawn)."""
        if self.generator is None:
            return 0.0
        return float(torch.rand((), generator=self.generator))

    def __call__(self, logits: Tensor) -> int:
        """The next token id from one row of logits (vocab,)."""
        return sample_rows([self], logits[None])[0]


def sample_rows(samplers: list[Sampler], logits: Tensor) -> list[int]:
    """Each row's next token from ``logits`` (R, vocab), row ``i`` drawn by ``samplers[i]``."""
    temperature = torch.tensor([s.temperature for s in samplers])
    top_p = torch.tensor([s.sampling.top_p for s in samplers])
    uniform = torch.tensor([s.draw() for s in samplers])
    return choose(logits, temperature, top_p, uniform).tolist()
