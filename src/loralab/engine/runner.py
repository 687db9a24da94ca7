"""The engine for one model: its KV cache, the plans of the rows it runs, and the step.

A plan says how rows run: the fast step (``step.py``) over the model's tensors where
``plan.fast_reason`` allows it, else the model's own modules (``llama.py``), with
``mixed_adapters`` around them when the rows run different adapters; the numbers are the
same either way. ``decode_step`` is one pure function of tensors (forward, head and the
choice of the next token, the rows' adapters among its inputs), the unit a compiler would
take; it runs eager: compiled, the step measured 1.3× faster at one row and 1.2× at 8, but
compiling took 30–35 s per shape (``benchmarks/bench_engine_step.py``), and over six
minutes with dynamic shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from . import llama, plan, step
from .sampling import choose
from .weights import Packed
from .weights import choose as choose_weights


@dataclass
class RowsPlan:
    """How a set of rows runs: their adapters (None: every row the layers' active one),
    the fast step's layer plans, or None and the reason the modules run instead."""

    adapters: tuple[str | None, ...] | None
    layers: list[plan.LayerPlan] | None
    reason: str | None
    known: frozenset = frozenset()  # the adapters whose checks passed (fast plans only)
    head: Packed | None = None  # the output head in bf16 or int8 (None: the model's lm_head)

    @property
    def fast(self) -> bool:
        return self.layers is not None


class Runner:
    """``rows`` cache rows of up to ``length`` positions each for ``model``; the fast
    step multiplies by ``weights`` (``weights.WEIGHTS``: fp32, bf16, int8 or auto, chosen by
    ``weights.choose``; ``self.weights`` is the choice, ``self.why`` its reason)."""

    def __init__(self, model: nn.Module, rows: int, length: int, weights: str = "fp32") -> None:
        reason = llama.supported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        device = model.get_input_embeddings().weight.device
        self.weights, self.why = choose_weights(weights, device)
        self.model = model
        self.cache = llama.new_cache(model, rows, length)
        self.rotary = step.rotary_tables(model, length)

    def grow(self, rows: int, length: int) -> None:
        """Room for ``rows`` rows of ``length`` positions (``KVCache.grow``)."""
        if length > self.cache.length:
            self.rotary = step.rotary_tables(self.model, length)
        self.cache.grow(rows, length)

    def plan(
        self, row_adapters: Sequence[str | None] | None = None, checked: RowsPlan | None = None
    ) -> RowsPlan:
        """The plan of rows that run ``row_adapters`` (one per row; None: each row the
        layers' active adapter). Gathers the rows' factors: build it when they change.
        ``checked``: a plan built since the model and its adapters last changed, whose
        checks (and each group's factors bank) the new one reuses."""
        adapters = tuple(row_adapters) if row_adapters is not None else None
        trust = checked is not None and checked.adapters is not None and adapters is not None
        if trust and checked.fast and set(adapters) <= set(checked.known):
            reason = None
        else:
            reason, trust = plan.fast_reason(self.model, adapters), False
        layers = plan.build(self.model, adapters, trust, self.weights) if reason is None else None
        known: frozenset = frozenset()
        head = None
        if reason is None:
            known = frozenset(adapters or ())
            if checked is not None and checked.fast:  # nothing changed since: still true
                known |= checked.known
            head = plan.head(self.model, self.weights)
        return RowsPlan(adapters, layers, reason, known, head)

    def forward(self, rows: RowsPlan, tokens: Tensor, positions: Tensor, first: int = 0) -> Tensor:
        """Hidden states (R, T, hidden) of ``tokens`` at ``positions`` in cache rows
        ``first`` …; R must be the plan's row count when it has per-row adapters."""
        with self._modules_for(rows):
            cache, rotary = self.cache, self.rotary
            return _forward(self.model, rows, cache, tokens, positions, rotary, None, first)

    def logits(self, rows: RowsPlan, hidden: Tensor) -> Tensor:
        """The head's logits of hidden states (R, hidden)."""
        with self._modules_for(rows):
            return step.head(self.model, rows.head, hidden)

    def decode_step(
        self,
        rows: RowsPlan,
        tokens: Tensor,
        positions: Tensor,
        temperature: Tensor,
        top_p: Tensor,
        uniform: Tensor,
        first: int = 0,
    ) -> Tensor:
        """Each row's next token after ``tokens`` (R,) at ``positions`` (R,)."""
        live = self.cache.live_length(int(positions.max()))
        with self._modules_for(rows):
            return _decode_step(
                self.model, rows, self.cache, tokens, positions, self.rotary, live, first,
                temperature, top_p, uniform,
            )  # fmt: skip

    def _modules_for(self, rows: RowsPlan):
        if rows.fast or rows.adapters is None:
            return contextlib.nullcontext()
        from ..lora.mixing import mixed_adapters

        return mixed_adapters(self.model, rows.adapters)


@dataclass
class Part:
    """Rows of one runner in a forward shared with others (``forward_together``)."""

    runner: Runner
    rows: RowsPlan
    tokens: Tensor
    positions: Tensor
    first: int = 0


def forward_together(parts: Sequence[Part]) -> list[Tensor]:
    """Each part's hidden states (R, T, hidden), from one forward where every part runs
    the fast step (``step.forward_spans``: each base weight read once for all the parts'
    tokens); else each part's own forward. The parts' runners share one model."""
    if not all(part.rows.fast for part in parts):
        return [p.runner.forward(p.rows, p.tokens, p.positions, p.first) for p in parts]
    spans = [
        step.Span(
            p.rows.layers, p.runner.cache, p.tokens, p.positions, p.runner.rotary, None, p.first
        )
        for p in parts
    ]
    return step.forward_spans(parts[0].runner.model, spans)


def _forward(model, rows: RowsPlan, cache, tokens, positions, rotary, live, first) -> Tensor:
    if rows.fast:
        return step.forward(model, rows.layers, cache, tokens, positions, rotary, live, first)
    return llama.forward(model, cache, tokens, positions, live, first)


def _decode_step(
    model, rows, cache, tokens, positions, rotary, live, first, temperature, top_p, uniform
) -> Tensor:
    hidden = _forward(model, rows, cache, tokens[:, None], positions[:, None], rotary, live, first)
    return choose(step.head(model, rows.head, hidden[:, 0]), temperature, top_p, uniform)
