"""The server's rows on loralab's engine (``engine/``): the running requests' keys and
values in one cache where each row sits at its own position (no left padding), and the
prompts being prefilled, a chunk of one prompt between two decoding steps (the prompts
take turns), so that a long prompt never stalls the running streams.

A prompt's chunk is sized to take about as long as ``CHUNK_STEPS`` decoding steps: after
each chunk its size is scaled by the ratio of that target to the time it took (a chunk's
cost grows with its position, as its attention reads more keys), so the other streams
wait at most about that many steps more for their next token; with no stream running, a
prompt goes in chunks of ``MAX_CHUNK``. Each prompt has a cache of its own, of its length
(no copy as it grows); when it is done it moves into the running rows (one copy of its
keys and values), and a row that leaves is replaced by the last one (one row's copy), so
the running rows stay the first rows of the cache and a step reads them as views.

Each row runs its own adapter: the rows' factors are gathered into the step's inputs when
the rows change (``Runner.plan``), never per step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..engine.runner import RowsPlan, Runner

log = logging.getLogger("loralab.serve")

MAX_CHUNK = 512  # prompt tokens per prefill forward when no stream is waiting
MIN_CHUNK = 16
CHUNK_STEPS = 1.5  # a chunk's time, in decoding steps (a round: the chunk and a step)
PREFILL_ROWS = 4  # prompts prefilled side by side, each in a cache of its own
_START_LENGTH = 256  # positions the rows' cache starts with; it doubles as rows need


@dataclass
class Prompt:
    """A prompt being prefilled: its tokens, adapter, and how many are in the cache."""

    tokens: list[int]
    adapter: str | None
    runner: Runner = field(repr=False)  # its own cache, of its length
    done: int = 0
    logits: Tensor | None = field(default=None, repr=False)  # its last token's, when done

    @property
    def finished(self) -> bool:
        return self.done == len(self.tokens)


class EngineRows:
    """The running rows (their adapters and lengths, in cache order) and the prompts."""

    def __init__(self, model: nn.Module, max_rows: int) -> None:
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.max_rows = max_rows
        self.rows = Runner(model, 1, _START_LENGTH)
        self.adapters: list[str | None] = []
        self.lengths: list[int] = []  # each running row's positions in the cache
        self.prompts: list[Prompt] = []
        self._plan: RowsPlan | None = None
        self.step_s = 0.0  # a decoding step's time (moving average)
        self.chunk_tokens = MIN_CHUNK  # the next chunk's size while streams run

    def __len__(self) -> int:
        return len(self.adapters)

    # -- prompts ---------------------------------------------------------------------------

    prompt_rows = PREFILL_ROWS

    def start(self, tokens: list[int], adapter: str | None) -> Prompt:
        prompt = Prompt(tokens, adapter, Runner(self.model, 1, len(tokens)))
        self.prompts.append(prompt)
        return prompt

    def drop(self, prompt: Prompt) -> None:
        self.prompts.remove(prompt)

    def chunk(self) -> int:
        """Prompt tokens the next prefill round may take."""
        return self.chunk_tokens if self.adapters else MAX_CHUNK

    def prefill(self) -> tuple[list[Prompt], list[Prompt]]:
        """One chunk of one prompt (the prompts take turns, so a short one never waits
        for a long one to finish): the prompts now complete (with their last token's
        logits), and those whose forward failed (dropped)."""
        if not self.prompts:
            return [], []
        prompt = self.prompts[0]
        budget = self.chunk()
        take = min(len(prompt.tokens) - prompt.done, budget)
        started = time.perf_counter()
        try:
            self._prefill(prompt, take)
        except Exception:
            log.exception("prefilling a prompt failed")
            self.drop(prompt)
            return [], [prompt]
        spent = time.perf_counter() - started
        if self.adapters and self.step_s > 0:
            self._steer(take, budget, spent)
        if prompt.finished:
            return [prompt], []
        self.prompts.append(self.prompts.pop(0))  # its next chunk after the others' turns
        return [], []

    def _steer(self, take: int, budget: int, spent: float) -> None:
        """Size the next chunk so that a round takes ``CHUNK_STEPS`` steps: scaled by the
        ratio of that target to this chunk's time (grown only after a full chunk: a short
        prompt says nothing about a longer chunk's time)."""
        target = CHUNK_STEPS * self.step_s
        if take < budget and spent < target:
            return
        scaled = take * target / max(spent, 1e-6)
        self.chunk_tokens = int(min(MAX_CHUNK, max(MIN_CHUNK, scaled)))

    def _prefill(self, prompt: Prompt, take: int) -> None:
        runner = prompt.runner
        span = prompt.tokens[prompt.done : prompt.done + take]
        tokens = torch.tensor([span], device=self.device)
        positions = torch.arange(prompt.done, prompt.done + take, device=self.device)[None]
        plan = runner.plan([prompt.adapter])
        hidden = runner.forward(plan, tokens, positions)
        prompt.done += take
        if prompt.finished:
            prompt.logits = runner.logits(plan, hidden[:, -1])[0]

    def join(self, prompt: Prompt) -> None:
        """A complete prompt becomes the last running row (its keys and values copied)."""
        row, length = len(self.adapters), len(prompt.tokens)
        self.rows.grow(_room(row + 1, self.max_rows), _room(length + 1))
        source, target = prompt.runner.cache, self.rows.cache
        for mine, theirs in ((target.keys, source.keys), (target.values, source.values)):
            for into, out in zip(mine, theirs, strict=True):
                into[row, :, :length] = out[0, :, :length]
        self.prompts.remove(prompt)
        self.adapters.append(prompt.adapter)
        self.lengths.append(length)
        self._plan = None

    # -- the running rows ------------------------------------------------------------------

    def step(self, tokens: list[int]) -> Tensor:
        """Logits (rows, vocabulary) of each running row's next token, after ``tokens``."""
        started = time.perf_counter()
        device = self.device
        self.rows.grow(len(self.adapters), _room(max(self.lengths) + 1))
        if self._plan is None:
            self._plan = self.rows.plan(self.adapters)
        ids = torch.tensor(tokens, device=device)[:, None]
        positions = torch.tensor(self.lengths, device=device)[:, None]
        hidden = self.rows.forward(self._plan, ids, positions)
        logits = self.rows.logits(self._plan, hidden[:, 0])
        self.lengths = [n + 1 for n in self.lengths]
        self.step_s = _average(self.step_s, time.perf_counter() - started)
        return logits

    def keep(self, indices: list[int]) -> list[int]:
        """Keep the running rows ``indices``; the order they now sit in (old indices): a
        row that left is replaced by the last row, one row's copy."""
        order = list(range(len(self.adapters)))
        gone = sorted(set(order) - set(indices), reverse=True)
        for row in gone:
            last = len(order) - 1
            if row != last:
                self.rows.cache.move(last, row, self.lengths[last])
                self.lengths[row] = self.lengths[last]
                self.adapters[row] = self.adapters[last]
                order[row] = order[last]
            order.pop()
            self.lengths.pop()
            self.adapters.pop()
        self._plan = None
        return order

    def changed(self) -> None:
        """The model or an adapter changed: gather the rows' factors again."""
        self._plan = None

    def clear(self) -> None:
        self.adapters, self.lengths, self.prompts, self._plan = [], [], [], None


def _room(needed: int, limit: int | None = None) -> int:
    """``needed`` rounded up to a power of two (a cache grows by doubling), at most ``limit``."""
    size = 1 << max(needed - 1, 0).bit_length()
    return size if limit is None else max(min(size, limit), needed)


def _average(mean: float, value: float, weight: float = 0.2) -> float:
    return value if mean == 0 else (1 - weight) * mean + weight * value
