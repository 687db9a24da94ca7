"""The server's rows on loralab's engine (``engine/``): the running requests' keys and
values in one cache where each row sits at its own position (no left padding), and the
prompts being prefilled between two decoding steps, a round's worth at a time, so that a
long prompt never stalls the running streams.

The waiting prompts that fit ``MAX_CHUNK`` tokens together go in whole, in one forward
(holding short prompts back costs more throughput, fewer rows per step, than the round's
length costs the streams). A longer prompt goes a chunk a round (every other round at
least) in a cache of its own, of its length (no copy as it grows); its chunk is sized to
take about ``CHUNK_STEPS`` decoding steps, scaled after each round by the ratio of that
target to the time it took (a chunk's cost grows with its position, as its attention
reads more keys), so the other streams wait at most about that many steps more for
their next token; with no stream running, a chunk is ``MAX_CHUNK`` tokens. A complete
prompt moves into the running rows (one copy of its keys and values), and a row that
leaves is replaced by the last one (one row's copy), so the running rows stay the first
rows of the cache and a step reads them as views.

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
_START_LENGTH = 256  # positions the rows' cache starts with; it doubles as rows need


@dataclass
class Prompt:
    """A prompt being prefilled: its tokens, adapter, how many are in a cache, and which
    cache (its own while it goes in chunks; a round's shared one when it went whole)."""

    tokens: list[int]
    adapter: str | None
    done: int = 0
    runner: Runner | None = field(default=None, repr=False)
    row: int = 0  # its row in ``runner``'s cache
    logits: Tensor | None = field(default=None, repr=False)  # its last token's, when done

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done

    @property
    def finished(self) -> bool:
        return self.done == len(self.tokens)


class EngineRows:
    """The running rows (their adapters and lengths, in cache order) and the prompts."""

    def __init__(self, model: nn.Module, max_rows: int, weights: str = "fp32") -> None:
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.max_rows = max_rows
        self.rows = Runner(model, 1, _START_LENGTH, weights)
        self.weights = self.rows.weights  # the choice (``engine/weights.py``) and its reason
        self.why = self.rows.why
        self.adapters: list[str | None] = []
        self.lengths: list[int] = []  # each running row's positions in the cache
        self.prompts: list[Prompt] = []
        self._plan: RowsPlan | None = None
        self._checked: RowsPlan | None = None  # the last plan checked since a change
        self.step_s = 0.0  # a decoding step's time (moving average)
        self.chunk_tokens = MIN_CHUNK  # the next round's prompt tokens while streams run
        self._long_turn = False  # a long prompt's chunk comes every other round at least

    # -- prompts ---------------------------------------------------------------------------

    def start(self, tokens: list[int], adapter: str | None) -> Prompt:
        prompt = Prompt(tokens, adapter)
        self.prompts.append(prompt)
        return prompt

    def drop(self, prompt: Prompt) -> None:
        self.prompts.remove(prompt)

    def chunk(self) -> int:
        """Prompt tokens the next prefill round may take."""
        return self.chunk_tokens if self.adapters else MAX_CHUNK

    def prefill(self) -> tuple[list[Prompt], list[Prompt]]:
        """One round: the waiting prompts that fit ``MAX_CHUNK`` tokens whole, in one
        forward together, oldest first; or one chunk of the oldest prompt that does not, in
        a cache of its own (every other round at least, so short prompts never wait for
        a long one and a long one is never starved). The prompts now complete (with their
        last token's logits), and those whose forward failed (dropped)."""
        if not self.prompts:
            return [], []
        budget = self.chunk()
        # Whole prompts of up to MAX_CHUNK tokens go in together, as they come: holding
        # them back costs more (fewer rows per step) than the round's length does.
        whole, left = [], MAX_CHUNK
        for prompt in self.prompts:
            if prompt.done == 0 and prompt.remaining <= left:
                whole.append(prompt)
                left -= prompt.remaining
        longs = [p for p in self.prompts if p not in whole]
        chunked = longs[0] if longs and (self._long_turn or not whole) else None
        self._long_turn = chunked is None and bool(longs)
        started = time.perf_counter()
        parts = whole if chunked is None else [chunked]
        take = (
            sum(p.remaining for p in whole) if chunked is None else min(chunked.remaining, budget)
        )
        try:
            if chunked is None:
                self._prefill_together(whole)
            else:
                self._prefill_chunk(chunked, take)
        except Exception:
            log.exception("prefilling failed")
            for prompt in parts:
                self.drop(prompt)
            return [], parts
        if self.adapters and self.step_s > 0:
            self._steer(take, budget, time.perf_counter() - started)
        return [p for p in parts if p.finished], []

    def _steer(self, take: int, budget: int, spent: float) -> None:
        """Size the next round so that it takes ``CHUNK_STEPS`` steps: scaled by the ratio
        of that target to this round's time, growing at most twofold a round (a longer
        chunk costs more per token: its attention reads more keys)."""
        target = CHUNK_STEPS * self.step_s
        scaled = take * target / max(spent, 1e-6)
        if scaled > budget:  # at most doubled: a round's cost grows faster than linearly
            scaled = min(scaled, 2 * budget)
        self.chunk_tokens = int(min(MAX_CHUNK, max(MIN_CHUNK, scaled)))

    def _prefill_together(self, prompts: list[Prompt]) -> None:
        """Whole prompts in one forward, right-padded, each row at its own positions."""
        longest = max(len(p.tokens) for p in prompts)
        runner = Runner(self.model, len(prompts), longest, self.weights)
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt.tokens)] = torch.tensor(prompt.tokens, device=self.device)
        positions = torch.arange(longest, device=self.device).expand(len(prompts), longest)
        plan = self._plan_for(runner, [p.adapter for p in prompts])
        hidden = runner.forward(plan, tokens, positions)
        last = torch.tensor([len(p.tokens) - 1 for p in prompts], device=self.device)
        logits = runner.logits(plan, hidden[torch.arange(len(prompts)), last])
        for row, prompt in enumerate(prompts):
            prompt.runner, prompt.row, prompt.done = runner, row, len(prompt.tokens)
            prompt.logits = logits[row]

    def _prefill_chunk(self, prompt: Prompt, take: int) -> None:
        if prompt.runner is None:
            prompt.runner = Runner(self.model, 1, len(prompt.tokens), self.weights)
        runner = prompt.runner
        span = prompt.tokens[prompt.done : prompt.done + take]
        tokens = torch.tensor([span], device=self.device)
        positions = torch.arange(prompt.done, prompt.done + take, device=self.device)[None]
        plan = self._plan_for(runner, [prompt.adapter])
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
                into[row, :, :length] = out[prompt.row, :, :length]
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
            self._plan = self._plan_for(self.rows, self.adapters)
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
        count = len(self.adapters)
        order = self.rows.cache.drop(set(range(count)) - set(indices), count, self.lengths)
        self.lengths = [self.lengths[i] for i in order]
        self.adapters = [self.adapters[i] for i in order]
        self._plan = None
        return order

    def changed(self) -> None:
        """The model or an adapter changed: check and gather the rows' factors again."""
        self._plan = self._checked = None

    def _plan_for(self, runner: Runner, adapters: list[str | None]) -> RowsPlan:
        """A plan for these rows, reusing the checks of the last one built since the
        model last changed (adapters change only through ``changed``'s caller)."""
        plan = runner.plan(adapters, self._checked)
        if self._checked is None or not plan.known <= self._checked.known:
            self._checked = plan
        return plan


def _room(needed: int, limit: int | None = None) -> int:
    """``needed`` rounded up to a power of two (a cache grows by doubling), at most ``limit``."""
    size = 1 << max(needed - 1, 0).bit_length()
    return size if limit is None else max(min(size, limit), needed)


def _average(mean: float, value: float, weight: float = 0.2) -> float:
    return value if mean == 0 else (1 - weight) * mean + weight * value
