"""The server's rows on loralab's engine (``engine/``): the running requests' keys and
values in one cache where each row sits at its own position (no left padding), and the
prompts being prefilled a round's worth at a time, so that a long prompt never stalls
the running streams.

A prefill round rides inside the running rows' decoding step (``round``: one forward,
each base weight read once for the step's rows and the round's prompt tokens; where the
products are bound by reading the weights, as on a CPU, the prompt's tokens cost little
more than their attention). With no stream running, or before a step alone has been
timed, a round runs alone (``prefill``).

The waiting prompts that fit ``MAX_CHUNK`` tokens together go in whole, in one round
(holding short prompts back costs more throughput, fewer rows per step, than the round's
length costs the streams). A longer prompt goes a chunk a round (every other round at
least) in a cache of its own, of its length (no copy as it grows; its pages touched as
the chunks come); its chunk is sized to take about ``CHUNK_STEPS`` decoding steps,
scaled after each chunk by the ratio of that target to the time it took (a chunk's cost
grows with its position, as its attention reads more keys), so that the other streams'
gap between two tokens stays near ``1 + CHUNK_STEPS`` steps; with no stream running, a
chunk is ``MAX_CHUNK`` tokens. A complete prompt moves into the running rows (one copy
of its keys and values), and a row that leaves is replaced by the last one (one row's
copy), so the running rows stay the first rows of the cache and a step reads them as
views.

Each row runs its own adapter: the rows' factors are gathered into the step's inputs when
the rows change (``Runner.plan``), never per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..engine.runner import Part, RowsPlan, Runner, forward_together

log = logging.getLogger("loralab.serve")

MAX_CHUNK = 512  # prompt tokens per prefill forward when no stream is waiting
MIN_CHUNK = 4  # deep in a long prompt a few tokens' attention may cost a step
CHUNK_STEPS = 1.0  # a chunk's time, in decoding steps (a round: the chunk and a step)
GROWTH = 1.5  # a chunk grows at most this much a round (its cost per token grows with it)
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


@dataclass
class _Work:
    """A prefill round: whole prompts together, or ``take`` tokens of one long prompt."""

    prompts: list[Prompt]
    take: int
    budget: int  # the chunk's size allowed when it was picked
    chunked: bool


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
        """One round alone (no stream waits, or none has run yet): the waiting prompts
        that fit ``MAX_CHUNK`` tokens whole, in one forward together, oldest first; or one
        chunk of the oldest prompt that does not, in a cache of its own (every other round
        at least, so short prompts never wait for a long one and a long one is never
        starved). The prompts now complete (with their last token's logits), and those
        whose forward failed (dropped)."""
        if not self.prompts:
            return [], []
        work = self._pick()
        started = time.perf_counter()
        try:
            part, finish = self._part(work)
            finish(*forward_together([part]))
        except Exception:
            log.exception("prefilling failed")
            for prompt in work.prompts:
                self.drop(prompt)
            return [], work.prompts
        self._steer(work, time.perf_counter() - started)
        return [p for p in work.prompts if p.finished], []

    def round(self, tokens: list[int]) -> tuple[Tensor, list[Prompt]]:
        """The running rows' step and the next prefill round (as ``prefill`` picks it) in
        one forward, each base weight read once for both: the rows' next logits (as
        ``step``) and the prompts now complete. The round is steered to take
        ``1 + CHUNK_STEPS`` decoding steps. If it fails, nothing has changed (the caller
        runs the two alone, to find whose fault it is)."""
        long_turn = self._long_turn
        work = self._pick()
        started = time.perf_counter()
        try:  # ``finish`` changes the prompts only once all its numbers are out
            part, finish = self._part(work)
            rows = self._step_part(tokens)
            hidden, prompt_hidden = forward_together([rows, part])
            logits = self.rows.logits(rows.rows, hidden[:, 0])
            finish(prompt_hidden)
        except Exception:
            self._long_turn = long_turn  # the keys and values written are written again
            raise
        self.lengths = [n + 1 for n in self.lengths]
        self._steer(work, time.perf_counter() - started, self.step_s)
        return logits, [p for p in work.prompts if p.finished]

    def _pick(self) -> _Work:
        """The next prefill round's prompts: whole ones together, or a long one's chunk."""
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
        if chunked is None:
            return _Work(whole, sum(p.remaining for p in whole), budget, chunked=False)
        return _Work([chunked], min(chunked.remaining, budget), budget, chunked=True)

    def _steer(self, work: _Work, spent: float, fixed: float = 0.0) -> None:
        """Size the next chunk so that its time (``spent`` less the ``fixed`` time of a
        step that shared its forward) is ``CHUNK_STEPS`` steps: scaled by the ratio of
        that target to this chunk's time, growing at most ``GROWTH``-fold a round (a longer
        chunk costs more per token: its attention reads more keys, and past a few dozen
        tokens the products are bound by arithmetic, not by reading the weights). Only a
        long prompt's chunk steers: whole short prompts cost less per token than a chunk
        deep in a long one, and steering by them would make that chunk too long."""
        if not work.chunked or not self.adapters or self.step_s <= 0:
            return
        target = CHUNK_STEPS * self.step_s
        scaled = work.take * target / max(spent - fixed, 1e-6)
        if scaled > work.budget:  # a round's cost grows faster than linearly
            scaled = min(scaled, GROWTH * work.budget)
        self.chunk_tokens = round(min(MAX_CHUNK, max(MIN_CHUNK, scaled)))

    def _part(self, work: _Work) -> tuple[Part, Callable[[Tensor], None]]:
        """The round's prompts as a part of a forward, and what to do with its hidden
        states: the prompts' new lengths, and the last token's logits of each complete one."""
        if work.chunked:
            return self._chunk_part(work.prompts[0], work.take)
        return self._whole_part(work.prompts)

    def _whole_part(self, prompts: list[Prompt]) -> tuple[Part, Callable[[Tensor], None]]:
        """Whole prompts in one part, right-padded, each row at its own positions."""
        longest = max(len(p.tokens) for p in prompts)
        runner = Runner(self.model, len(prompts), longest, self.weights)
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt.tokens)] = torch.tensor(prompt.tokens, device=self.device)
        positions = torch.arange(longest, device=self.device).expand(len(prompts), longest)
        plan = self._plan_for(runner, [p.adapter for p in prompts])
        last = torch.tensor([len(p.tokens) - 1 for p in prompts], device=self.device)

        def finish(hidden: Tensor) -> None:
            logits = runner.logits(plan, hidden[torch.arange(len(prompts)), last])
            for row, prompt in enumerate(prompts):
                prompt.runner, prompt.row, prompt.done = runner, row, len(prompt.tokens)
                prompt.logits = logits[row]

        return Part(runner, plan, tokens, positions), finish

    def _chunk_part(self, prompt: Prompt, take: int) -> tuple[Part, Callable[[Tensor], None]]:
        """The prompt's next ``take`` tokens, in its own cache."""
        if prompt.runner is None:
            prompt.runner = Runner(self.model, 1, len(prompt.tokens), self.weights)
        runner = prompt.runner
        span = prompt.tokens[prompt.done : prompt.done + take]
        tokens = torch.tensor([span], device=self.device)
        positions = torch.arange(prompt.done, prompt.done + take, device=self.device)[None]
        plan = self._plan_for(runner, [prompt.adapter])

        def finish(hidden: Tensor) -> None:
            logits = None
            if prompt.done + take == len(prompt.tokens):
                logits = runner.logits(plan, hidden[:, -1])[0]
            prompt.done += take
            prompt.logits = logits

        return Part(runner, plan, tokens, positions), finish

    def join(self, prompt: Prompt) -> None:
        """A complete prompt becomes the last running row (its keys and values copied)."""
        row, length = len(self.adapters), len(prompt.tokens)
        self.rows.grow(_room(row + 1, self.max_rows), _room(length + 1))
        source, target = prompt.runner.cache, self.rows.cache
        target.ensure(length)  # every row's positions up to it, before the copy writes them
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
        part = self._step_part(tokens)
        hidden = self.rows.forward(part.rows, part.tokens, part.positions)
        logits = self.rows.logits(part.rows, hidden[:, 0])
        self.lengths = [n + 1 for n in self.lengths]
        self.step_s = _average(self.step_s, time.perf_counter() - started)
        return logits

    def _step_part(self, tokens: list[int]) -> Part:
        """The running rows' step as a part of a forward: ``tokens`` at their lengths."""
        self.rows.grow(len(self.adapters), _room(max(self.lengths) + 1))
        if self._plan is None:
            self._plan = self._plan_for(self.rows, self.adapters)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        positions = torch.tensor(self.lengths, device=self.device)[:, None]
        return Part(self.rows, self._plan, ids, positions)

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
