"""Continuous batching: one thread runs one decoding step for every running request.

A request waits in a bounded queue until a row is free and its adapter is resident. On
loralab's engine (the Llama family, ``engine_rows.py``) its prompt is then prefilled a
chunk at a time between the running rows' steps, and it joins them when its first token
is out; on other models (or ``--engine hf``) the waiting prompts are prefilled together
in one forward of the model, Transformers' cache left-padded (``batch_cache.py``), and
join between two steps. At every step each row runs its own adapter (or none,
through ``mixed_adapters``) and samples its own next token; a request that finished,
or whose client went away, leaves at once and frees its row. Everything that changes the
model (loading, swapping, evicting adapters) runs on this thread too, between steps, so
a step never sees a half-changed model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..lora.adapters import set_active_adapter
from ..lora.mixing import mixed_adapters
from ..models.devices import model_device
from .adapter_pool import AdapterPool
from .batch_cache import BatchCache, new_cache
from .engine_rows import EngineRows, Prompt
from .errors import RequestError
from .metrics import Metrics
from .sampling import Sampler, Sampling, sample_rows
from .text import TextStream

log = logging.getLogger("loralab.serve")

# How long a job waiting for an adapter slot lets later jobs take the slots' adapters.
PRIORITY_AFTER_S = 2.0


@dataclass
class Text:
    """New text for the client (may be empty only in the final event's company), and the
    tokens sampled since the previous ``Text`` (a token's text may wait for the next)."""

    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # every token sampled, a stop included


@dataclass
class Failed:
    error: RequestError


Event = Text | Finished | Failed


@dataclass
class Job:
    """One completion to produce (one choice of one HTTP request)."""

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    emit: Callable[[Event], None]  # called on the engine's thread
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's extension: a row ends on any
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the client's side; the engine drops the job


@dataclass
class _Row:
    job: Job
    sampler: Sampler | None
    text: TextStream
    last: int = 0  # the token the next step feeds
    tokens: list[int] = field(default_factory=list)  # sampled so far
    tokens_sent: int = 0  # of them, given out with a Text
    ended: bool = False  # its event was sent and its adapter given back

    @property
    def generated(self) -> int:
        return len(self.tokens)


class QueueFull(RequestError):
    pass


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pool: AdapterPool,
        metrics: Metrics,
        max_batch: int = 32,
        max_waiting: int = 256,
        engine: str = "auto",
        engine_weights: str = "fp32",
    ) -> None:
        self.model = model
        self.device = model_device(model)  # the inputs go where the weights are
        self.tokenizer = tokenizer
        self.pool = pool
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.context_length = int(model.config.max_position_embeddings)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # valid input ids
        self.eos = tokenizer.eos_token_id
        self.engine_rows = _engine_rows(model, max_batch, engine, engine_weights)
        if self.engine_rows is None:
            new_cache(model.config)  # refuses models whose cache cannot be split by rows
        self.cache = BatchCache(model.config)
        self.rows: list[_Row] = []
        self.prefilling: list[tuple[Job, Prompt]] = []  # on the engine: prompts going in
        self.waiting: deque[Job] = deque()
        self.commands: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        # The rows' mixed_adapters block stays open across steps while the rows and the
        # model stay as they are; entering it gathers every layer's factors for the rows.
        self._mix: contextlib.ExitStack | None = None
        self._mix_rows: tuple[str | None, ...] = ()
        self._thread = threading.Thread(target=self._loop, name="loralab-engine", daemon=True)

    # -- the client's side (any thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(
                    f"the server is full: {self.max_waiting} requests are already waiting; "
                    "retry later",
                    status=429,
                )
            self.waiting.append(job)
            self.metrics.waiting.set(len(self.waiting))
            self._wake.notify()

    def call(self, function: Callable) -> concurrent.futures.Future:
        """Run ``function()`` on the engine's thread between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self.commands.append((function, future))
            self._wake.notify()
        return future

    # -- the engine's thread --------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while (commands := self._next_commands()) is not None:
            if commands or self.pool.has_garbage():
                self._unmix()  # the model may change: no step sees it half-changed
                self.pool.sweep()
            for function, future in commands:
                try:
                    future.set_result(function())
                except BaseException as error:  # the caller's to report
                    future.set_exception(error)
            self._work()
        self._unmix()
        prefilling = [job for job, _ in self.prefilling]
        for job in [*self.waiting, *prefilling, *(row.job for row in self.rows)]:
            job.emit(Failed(RequestError("the server is shutting down", status=503)))

    def _work(self) -> None:
        """One round: admit waiting jobs, a chunk of the prompts going in, one step."""
        try:
            self._admit()
        except Exception:  # a bug: no request may wait on a state that fails each step
            log.exception("the engine failed to admit requests")
            self._fail_waiting()
        if self.prefilling and self.rows and self._shares_steps():
            self._step_or_fail_batch(prefill=True)  # the prompts' round inside the step
            return
        if self.prefilling:
            self._prefill_chunk()
        if self.rows:
            self._step_or_fail_batch()

    def _shares_steps(self) -> bool:
        """Whether the prompts' round runs inside the rows' step (one forward, the weights
        read once): on the engine, once a step alone has been timed (the round is sized
        in steps)."""
        return self.engine_rows is not None and self.engine_rows.step_s > 0

    def _next_commands(self) -> list[tuple[Callable, concurrent.futures.Future]] | None:
        """Waits until there is work; the commands to run before it (None: stop)."""
        with self._wake:
            while not (
                self._stopping or self.commands or self.waiting or self.rows or self.prefilling
            ):
                self._wake.wait()
            if self._stopping:
                return None
            commands = list(self.commands)
            self.commands.clear()
        return commands

    def _step_or_fail_batch(self, prefill: bool = False) -> None:
        try:
            self._step(prefill)
        except Exception:  # a bug must not stop the server: fail this batch only
            log.exception("the engine failed a step")
            for row in self.rows:
                self._end(row, Failed(RequestError("internal error", status=500)))
            self.rows, self.cache = [], BatchCache(self.model.config)
            if self.engine_rows is not None:
                self.engine_rows.keep([])
            self._unmix()

    def _admit(self) -> None:
        """Prefill waiting jobs into free rows, oldest first, all in one forward."""
        chosen = self._choose()
        if not chosen:
            return
        if self.engine_rows is not None:  # its prompts go in a chunk at a time
            for job in chosen:
                self.prefilling.append((job, self.engine_rows.start(job.prompt, job.adapter)))
            return
        self._unmix()  # the prefill mixes its own rows
        try:
            self._prefill(chosen)
        except Exception:
            if len(chosen) == 1:
                self._fail_prefill(chosen[0])
                return
            for job in chosen:  # one job's fault must not fail the others: each alone
                try:
                    self._prefill([job])
                except Exception:
                    self._fail_prefill(job)

    def _choose(self) -> list[Job]:
        """The waiting jobs that take free rows now, their adapters acquired, oldest first.

        A job whose adapter cannot be resident yet (every slot in use) lets later ones
        pass, but only for ``PRIORITY_AFTER_S``: from then on, later jobs that would keep
        an evictable adapter busy wait too, so that one of those adapters falls idle and
        the oldest job gets its slot (no job waits behind a stream of later ones forever).
        """
        with self._wake:
            for job in [job for job in self.waiting if job.cancelled]:  # clients that left
                self.waiting.remove(job)
            self.metrics.waiting.set(len(self.waiting))
            candidates = list(self.waiting)
        chosen: list[Job] = []
        starving = False  # an old job waits for a slot: evictable adapters take no more rows
        now = time.monotonic()
        for job in candidates:
            if len(self.rows) + len(self.prefilling) + len(chosen) >= self.max_batch:
                break
            if starving and not self.pool.is_pinned(job.adapter):
                continue
            if not self.pool.is_resident(job.adapter):
                if not self.pool.has_room():
                    starving = now - job.arrived >= PRIORITY_AFTER_S
                    continue  # it waits for a slot; the model is left as it is
                self._unmix()  # acquiring it changes the model
            if self._acquire(job):
                chosen.append(job)
        return chosen

    def _acquire(self, job: Job) -> bool:
        """Puts the job's adapter on the model; False if it must wait. A failure fails this
        job alone, which leaves the queue."""
        try:
            if not self.pool.acquire(job.adapter):
                return False
        except Exception as error:
            if not isinstance(error, RequestError):
                log.exception("putting adapter %r on the model failed", job.adapter)
                error = RequestError("internal error", status=500)
            self._take(job)
            job.emit(Failed(error))
            return False
        self._take(job)
        return True

    def _fail_waiting(self) -> None:
        with self._wake:
            jobs = list(self.waiting)
            self.waiting.clear()
            self.metrics.waiting.set(0)
        for job in jobs:
            job.emit(Failed(RequestError("internal error", status=500)))

    def _fail_prefill(self, job: Job) -> None:
        log.exception("prefill failed")
        self.pool.release(job.adapter)
        job.emit(Failed(RequestError("internal error", status=500)))

    def _take(self, job: Job) -> None:
        with self._wake:
            self.waiting.remove(job)
            self.metrics.waiting.set(len(self.waiting))

    def _prefill(self, jobs: list[Job]) -> None:
        """The jobs' prompts in one forward (left-padded), and each one's first token.

        A job alone runs exactly as ``loralab generate`` runs one prompt: its adapter
        active, no padding.
        """
        lengths = [len(job.prompt) for job in jobs]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        device = self.device
        rows = [[pad] * (width - len(job.prompt)) + job.prompt for job in jobs]
        ids = torch.tensor(rows, device=device)
        columns = torch.arange(width, device=device)
        starts = torch.tensor([width - n for n in lengths], device=device)[:, None]
        mask = (columns[None, :] >= starts).long()
        positions = (columns[None, :] - starts).clamp(min=0)
        cache = new_cache(self.model.config)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        with contextlib.ExitStack() as stack:
            if len(jobs) == 1:
                set_active_adapter(self.model, jobs[0].adapter)
            else:
                stack.enter_context(mixed_adapters(self.model, [job.adapter for job in jobs]))
            out = self.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        logits = _on_cpu(out.logits[:, -1])
        now = time.monotonic()
        rows, going = [], []
        for i, job in enumerate(jobs):
            self.metrics.prompt_tokens.inc(lengths[i])
            self.metrics.time_to_first_token.observe(now - job.arrived)
            row = _Row(job, None, TextStream(self.tokenizer, job.stop))
            try:
                row.sampler = Sampler(job.sampling)
                finished = self._advance(row, row.sampler(logits[i]))
            except Exception:  # this job's fault alone
                log.exception("a row failed")
                self._end(row, Failed(RequestError("internal error", status=500)))
                continue
            if not finished:
                rows.append(row)
                going.append(i)
        # only now, when every job has its first token, do the rows join the batch
        self.rows += rows
        self.cache.add(cache, lengths, going)
        self.metrics.running.set(len(self.rows))

    def _step(self, prefill: bool = False) -> None:
        """One new token for every running row; with ``prefill``, the prompts' next round
        in the same forward (on the engine)."""
        cancelled = [row.job.cancelled for row in self.rows]  # one reading: clients go any time
        for row, gone in zip(self.rows, cancelled, strict=True):
            if gone:
                self._end(row, None)
        self._keep([i for i, gone in enumerate(cancelled) if not gone])
        if prefill:
            self._drop_cancelled_prompts()
            prefill = bool(self.prefilling)
        if not self.rows:
            if prefill:
                self._prefill_chunk()
            return
        self.metrics.batch_size.observe(len(self.rows))
        logits, complete = self._next_logits(prefill)
        tokens = self._sample(logits)
        going = []
        for i, row in enumerate(self.rows):
            try:
                token = tokens[i] if tokens is not None else row.sampler(logits[i])
                if not self._advance(row, token):
                    going.append(i)
            except Exception:  # this row's fault alone
                log.exception("a row failed")
                self._end(row, Failed(RequestError("internal error", status=500)))
        self._keep(going)
        if prefill and complete is None:  # the shared forward failed: the round alone
            self._prefill_chunk()
        elif prefill:
            self._prompts_out(complete, [])

    def _sample(self, logits: Tensor) -> list[int] | None:
        """Every row's next token in one call; None if that failed, so that each row
        samples alone and a failure stays that row's."""
        try:
            return sample_rows([row.sampler for row in self.rows], logits)
        except Exception:
            return None

    def _next_logits(self, prefill: bool) -> tuple[Tensor, list[Prompt] | None]:
        """The rows' next logits and, with ``prefill``, the prompts that the step's round
        completed. If a step with a round fails, the step runs again alone (its failure
        fails the batch, as ever) and the completed prompts are None: the caller runs the
        round alone after the step (its failure fails its prompts alone, as ever)."""
        if self.engine_rows is None:
            return self._transformers_step(), []
        tokens = [row.last for row in self.rows]
        if not prefill:
            return _on_cpu(self.engine_rows.step(tokens)), []
        try:
            logits, complete = self.engine_rows.round(tokens)
        except Exception:
            log.exception("a step with a prompt's round failed; each runs again alone")
            return _on_cpu(self.engine_rows.step(tokens)), None
        return _on_cpu(logits), complete

    def _transformers_step(self) -> Tensor:
        mask, positions = self.cache.step_inputs()
        ids = torch.tensor([[row.last] for row in self.rows], device=self.device)
        self._mixed()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache.cache,
            use_cache=True,
        )
        self.cache.stepped()
        return _on_cpu(out.logits[:, -1])

    def _prefill_chunk(self) -> None:
        """The next chunk of the prompts going in (engine), alone; those complete get
        their first token and join the running rows. A prompt that fails fails its
        request alone."""
        self._drop_cancelled_prompts()
        if self.prefilling:
            self._prompts_out(*self.engine_rows.prefill())

    def _drop_cancelled_prompts(self) -> None:
        for job, prompt in [entry for entry in self.prefilling if entry[0].cancelled]:
            self._untrack(prompt)
            self.engine_rows.drop(prompt)
            self.pool.release(job.adapter)

    def _prompts_out(self, complete: list[Prompt], failed: list[Prompt]) -> None:
        """Prompts out of a prefill round: the complete ones sample their first token and
        join the running rows; the failed ones fail their requests."""
        jobs = {id(prompt): job for job, prompt in self.prefilling}
        for prompt in failed:  # its request alone fails (the engine logged why)
            job = jobs[id(prompt)]
            self._untrack(prompt)
            self.pool.release(job.adapter)
            job.emit(Failed(RequestError("internal error", status=500)))
        now = time.monotonic()
        for prompt in complete:
            job = jobs[id(prompt)]
            self._untrack(prompt)
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self.metrics.time_to_first_token.observe(now - job.arrived)
            row = _Row(job, None, TextStream(self.tokenizer, job.stop))
            try:
                row.sampler = Sampler(job.sampling)
                finished = self._advance(row, row.sampler(_on_cpu(prompt.logits)))
            except Exception:  # this job's fault alone
                log.exception("a row failed")
                self._end(row, Failed(RequestError("internal error", status=500)))
                finished = True
            if finished:
                self.engine_rows.drop(prompt)
                continue
            self.engine_rows.join(prompt)
            self.rows.append(row)
        self.metrics.running.set(len(self.rows))

    def _untrack(self, prompt: Prompt) -> None:
        """The prompt is no longer going in (it joined, ended, failed or was cancelled)."""
        self.prefilling = [entry for entry in self.prefilling if entry[1] is not prompt]

    def _mixed(self) -> None:
        rows = tuple(row.job.adapter for row in self.rows)
        if self._mix is not None and rows == self._mix_rows:
            return
        self._unmix()
        stack = contextlib.ExitStack()
        stack.enter_context(mixed_adapters(self.model, rows))
        self._mix, self._mix_rows = stack, rows

    def _unmix(self) -> None:
        if self.engine_rows is not None:
            self.engine_rows.changed()  # the model may change: the rows' factors with it
        if self._mix is not None:
            self._mix.close()
            self._mix = None

    def _keep(self, indices: list[int]) -> None:
        if len(indices) != len(self.rows):
            if self.engine_rows is not None:
                order = self.engine_rows.keep(indices)
            else:
                order = indices
                self.cache.keep(indices)
            self.rows = [self.rows[i] for i in order]
            self.metrics.running.set(len(self.rows))

    def _advance(self, row: _Row, token: int) -> bool:
        """Take the row's new token; True when the row has finished (and was ended)."""
        row.tokens.append(token)
        self.metrics.generation_tokens.inc()
        job = row.job
        if token == self.eos and not job.ignore_eos:
            reason = "stop"
            text = row.text.finish()
        else:
            text = row.text.push(token)
            reason = None
            if row.text.stopped:
                reason = "stop"
            elif token in job.stop_token_ids:  # its text is kept, as vLLM keeps it
                reason = "stop"
                text += row.text.finish()
            elif (
                row.generated >= job.max_tokens
                or len(job.prompt) + row.generated >= self.context_length
            ):
                reason = "length"
                text += row.text.finish()
        if text:
            job.emit(Text(text, row.tokens[row.tokens_sent :]))
            row.tokens_sent = len(row.tokens)
        if reason is None:
            row.last = token
            return False
        self._end(row, Finished(reason, len(job.prompt), row.generated, row.tokens))
        return True

    def _end(self, row: _Row, event: Event | None) -> None:
        """Send the row's last event and give its adapter back, once whatever the path."""
        if row.ended:
            return
        row.ended = True
        self.pool.release(row.job.adapter)
        if event is not None:
            row.job.emit(event)


def _engine_rows(
    model: nn.Module, max_batch: int, engine: str, weights: str = "fp32"
) -> EngineRows | None:
    """The rows on loralab's engine: with ``auto`` (the default) wherever it runs the model
    (the Llama family; other models run Transformers' forward and cache, and the log says
    why), with ``engine`` or refused with the reason, never with ``hf``. At 32 clients it
    gives 1.14× Transformers' path's throughput in fp32 and a long prompt no longer stalls
    the other streams (``benchmarks/results_serve_engine.md``, ``results_serve_stall.md``).
    ``weights``: its base weights' format (``engine/weights.py``)."""
    if engine == "hf":
        return None
    from ..engine import supported_reason

    reason = supported_reason(model)
    if reason is not None:
        if engine == "engine":
            raise ValueError(f"the engine cannot serve this model: {reason}")
        log.warning("serving with Transformers' forward and cache: %s", reason)
        return None
    return EngineRows(model, max_batch, weights)


def _on_cpu(logits: Tensor) -> Tensor:
    """The last position's logits of every row, in fp32 on the CPU, in one copy per step:
    the samplers' seeded generators are CPU generators (a seed gives the same text on any
    device), and a half-precision base samples from fp32 probabilities. On an fp32 CPU
    model this is the tensor itself."""
    return logits.float().cpu()
