"""The runs of an experiment: each arm trained and scored once per seed, side by side in
worker processes.

An experiment is a list of *arms* (a task and the training settings that differ), each
trained and scored once per seed. Each run trains with ``train.train`` and scores with
``evaluate.evaluate_task`` on a test split that is the same for every arm and seed (the
data seed is fixed; the seed varies the initialisation, dropout and data order).

Every run trains on one thread, and ``Scale.jobs`` runs train side by side, each in its
own process. On the 2-core build machine, idle, two one-thread processes did 1.3× the
work of one process on two threads (two 120-step MiniLM runs took 37 s side by side; one
took 24 s on two threads), and one thread per run makes every number independent of the
number of jobs and of the machine's core count.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from . import settings as experiment_settings
from .settings import (
    DATA_SEED,
    HEAD_LEARNING_RATE,
    LEARNING_RATES,
    RUN_THREADS,
    Arm,
    Scale,
    primary_metric,
)
from .store import RunStore, run_key


@dataclass
class RunResult:
    """One arm trained and scored with one seed."""

    label: str
    task: str
    seed: int
    metrics: dict[str, float]
    trainable: int
    total: int
    train_seconds: float
    eval_seconds: float
    settings: dict[str, Any]
    final_trainable: int = 0  # parameters that still matter at the end (AdaLoRA prunes)
    extra: dict[str, Any] = field(default_factory=dict)  # what ``inspect`` read from the model
    validation: dict[str, float] = field(default_factory=dict)  # scored when selecting


def say(line: str) -> None:
    """Print a progress line at once (a log redirected to a file is not left buffered)."""
    print(line, flush=True)


Inspect = Callable[["RunResult", Any], "dict[str, Any] | None"]
"""Reads more from a trained model: ``inspect(run, model)`` returns ``run.extra``. It runs in
the run's process, so it is a module-level function (a worker process imports it)."""


def run_settings(
    arm: Arm, seed: int, scale: Scale, workdir: Path, model: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Every ``TrainConfig`` field a run of ``arm`` with ``seed`` at ``scale`` sets.

    ``model`` is the (name, kind) to train, by default ``settings.TASK_MODELS[arm.task]``."""
    model_name, kind = model or experiment_settings.TASK_MODELS[arm.task]
    head = {"head_learning_rate": HEAD_LEARNING_RATE} if kind == "classification" else {}
    # Only when set: a dense run's settings, and so its key in the result store, stay as
    # they were before quantized bases existed.
    if scale.quantized_base is not None:
        head["quantized_base"] = scale.quantized_base
    return {
        "model": model_name,
        "model_kind": kind,
        "task": arm.task,
        "seed": seed,
        "data_seed": DATA_SEED,
        "train_size": scale.train_size,
        "validation_size": 0,
        "max_steps": scale.steps,
        "warmup_steps": max(1, scale.steps // 10),
        "batch_size": scale.batch_size,
        "max_length": scale.max_length,
        "learning_rate": _own_rate(arm),
        # The experiments' LoRA recipe, as they were run and reported: α = 16 (α/r = 2 at
        # r = 8; LoraConfig's default is PEFT's α = 8) and no dropout. Arms may override.
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "eval_every": 0,
        "save_every": 0,
        "progress": False,
        "output_dir": str(workdir / f"{_slug(arm.label)}-{arm.task}-seed{seed}"),
        **head,
        **arm.settings,
    }


def train_and_score(
    arm: Arm,
    seed: int,
    scale: Scale,
    workdir: Path,
    inspect: Inspect | None = None,
    model: tuple[str, str] | None = None,
    validation_size: int = 0,
) -> RunResult:
    """Train ``arm`` with ``seed`` at ``scale`` and score it on the task's test split (and
    on ``validation_size`` validation examples, held out from training and test)."""
    from ..evaluate import evaluate_task
    from ..methods import get_method
    from ..tasks import get_task
    from ..training.config import TrainConfig
    from ..training.loop import train

    settings = run_settings(arm, seed, scale, workdir, model)
    result = train(TrainConfig(**settings))
    task = get_task(arm.task)
    splits = task.splits(seed=DATA_SEED, test_size=scale.test_size, validation_size=validation_size)
    evaluation = evaluate_task(result.model, result.tokenizer, task, splits["test"], batch_size=32)
    validation, seconds = {}, evaluation.seconds
    if validation_size:
        scored = evaluate_task(
            result.model, result.tokenizer, task, splits["validation"], batch_size=32
        )
        validation, seconds = scored.metrics, seconds + scored.seconds
    final = get_method(settings.get("method", "lora")).final_trainable
    run = RunResult(
        label=arm.label,
        task=arm.task,
        seed=seed,
        metrics=evaluation.metrics,
        trainable=result.trainable,
        total=result.total,
        train_seconds=result.seconds,
        eval_seconds=seconds,
        settings=settings,
        final_trainable=result.trainable if final is None else final(result.model),
        validation=validation,
    )
    if inspect is not None:
        run.extra = inspect(run, result.model) or {}
    return run


@dataclass(frozen=True)
class _Job:
    """One run, as a worker process receives it."""

    arm: Arm
    seed: int
    scale: Scale
    workdir: Path
    model: tuple[str, str]  # resolved by the parent: tests point the tasks at tiny models
    inspect: Inspect | None
    validation_size: int = 0

    def key(self) -> tuple[str, dict[str, Any]]:
        """The run's key in the result store, and what it hashes."""
        settings = run_settings(self.arm, self.seed, self.scale, self.workdir, self.model)
        inspect = self.inspect and f"{self.inspect.__module__}.{self.inspect.__qualname__}"
        scoring = {
            "test_size": self.scale.test_size,
            "validation_size": self.validation_size,
            "eval_batch_size": 32,
            "inspect": inspect,
        }
        return run_key(settings, scoring)


class RunsMissing(Exception):
    """Runs of the plan that are neither in the store nor this shard's to train: the
    report waits for them (another shard, or a later run, trains them)."""

    def __init__(self, name: str, missing: int, total: int, store: Path | None) -> None:
        self.missing, self.total = missing, total
        super().__init__(
            f"{name}: {missing} of {total} runs are not in {store} yet (other shards train "
            "them); run the same command again when they are, or without --shard, and the "
            "report is written from the store"
        )


def _run_job(job: _Job) -> RunResult:
    with torch_threads(RUN_THREADS):
        return train_and_score(
            job.arm, job.seed, job.scale, job.workdir, job.inspect, job.model, job.validation_size
        )


def run_plan(
    name: str,
    plan: Sequence[tuple[Arm, int]],
    scale: Scale,
    workdir: Path,
    log: Callable[[str], None] = say,
    inspect: Inspect | None = None,
    validate: bool = False,
) -> list[RunResult]:
    """Every (arm, seed) of ``plan``, ``scale.jobs`` at a time, with one line per finished
    run; the results come back in the plan's order.

    ``validate`` scores each run on its scale's validation examples too. With
    ``scale.store`` a run already stored there is read, not trained, and each run is
    stored as soon as it finishes; with ``scale.shard`` only this shard's share of the
    rest is trained, and ``RunsMissing`` says how many others the plan still waits for.
    """
    jobs = [_job(arm, seed, scale, workdir, inspect, validate) for arm, seed in plan]
    store = RunStore(scale.store) if scale.store else None
    keys = [job.key() for job in jobs] if store is not None else [None] * len(jobs)
    results = _stored_results(jobs, keys, store)
    todo = [
        index
        for index, result in enumerate(results)
        if result is None and (scale.shard is None or scale.shard.owns(index))
    ]
    if store is not None and len(todo) < len(jobs):
        found = sum(r is not None for r in results)
        log(f"{name}: {found} of {len(jobs)} runs found in {store.directory}")
    finished = 0

    def done(index: int, run: RunResult) -> None:
        nonlocal finished
        results[index] = run
        if store is not None:
            store.put(keys[index][0], keys[index][1], run)
        finished += 1
        shown = ", ".join(f"{k} {v:.2f}" for k, v in run.metrics.items())
        log(
            f"[{finished}/{len(todo)}] {name}: {run.label} on {run.task}, seed {run.seed}: "
            f"{shown} ({run.train_seconds + run.eval_seconds:.0f} s)"
        )

    workers = min(scale.jobs, len(todo))
    if workers <= 1:
        for index in todo:
            done(index, _run_job(jobs[index]))
    elif todo:
        _run_in_workers(jobs, todo, workers, done)
    missing = sum(r is None for r in results)
    if missing:
        raise RunsMissing(name, missing, len(jobs), store.directory if store is not None else None)
    return results


def _job(
    arm: Arm, seed: int, scale: Scale, workdir: Path, inspect: Inspect | None, validate: bool
) -> _Job:
    own = scale.for_task(arm.task)
    model = experiment_settings.TASK_MODELS[arm.task]
    return _Job(arm, seed, own, workdir, model, inspect, own.validation_size if validate else 0)


def _stored_results(
    jobs: list[_Job], keys: list[Any], store: RunStore | None
) -> list[RunResult | None]:
    """Each job's result where the store already holds it (under this plan's label: the key
    does not hold one), else None."""
    if store is None:
        return [None] * len(jobs)
    results: list[RunResult | None] = []
    for job, (key, _) in zip(jobs, keys, strict=True):
        stored = store.get(key)
        results.append(
            None if stored is None else replace(RunResult(**stored), label=job.arm.label)
        )
    return results


def _run_in_workers(
    jobs: list[_Job], todo: list[int], workers: int, done: Callable[[int, RunResult], None]
) -> None:
    """The ``todo`` jobs in ``workers`` processes, ``done`` called as each finishes. On an
    error or Ctrl-C the runs in flight still finish and are kept, for the next attempt."""
    # spawn, not fork: a fork of a process whose PyTorch threads have started can hang.
    context = multiprocessing.get_context("spawn")
    quiet = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled())
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=start_worker, initargs=quiet
    ) as pool:
        futures = {pool.submit(_run_job, jobs[index]): index for index in todo}
        reported: set[int] = set()
        try:
            for future in as_completed(futures):
                reported.add(futures[future])
                done(futures[future], future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            for future, index in futures.items():
                finished_well = future.done() and not future.cancelled()
                if index not in reported and finished_well and future.exception() is None:
                    done(index, future.result())
            raise


def start_worker(verbosity: int, progress_bars: bool) -> None:
    """A worker logs as its parent does (the CLI turns Transformers' load bars off), and
    ends with it: a parent killed outright leaves no runs training for nobody (Linux)."""
    transformers_logging.set_verbosity(verbosity)
    if not progress_bars:
        transformers_logging.disable_progress_bar()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Selection:
    """How one arm's learning rate was chosen: every candidate's validation score."""

    label: str
    task: str
    metric: str
    candidates: list[dict[str, float]]  # {"learning_rate", "validation", "seconds"}
    chosen: float


class Runs(list):
    """An experiment's results, in its plan's order, with how each arm's rate was chosen."""

    def __init__(self, results: Sequence[RunResult], selections: Sequence[Selection] = ()):
        super().__init__(results)
        self.selections = list(selections)


def run_arms(
    name: str,
    arms: Sequence[Arm],
    scale: Scale,
    workdir: Path,
    log: Callable[[str], None] = say,
    inspect: Inspect | None = None,
) -> Runs:
    """Every arm with every seed (seeds outermost: a cut-short run still covers every arm).

    With a learning-rate grid (``Scale.lr_grid``) each arm first trains every candidate
    rate with the first seed, scored on validation too; where the best sits on the grid's
    edge, one more rate a grid step outward is tried. The best rate then trains with the
    other seeds, and the first seed's run of it is reused."""
    first, seeds = scale.seeds[0], scale.seeds
    options = [_candidates(arm, scale.for_task(arm.task)) for arm in arms]
    searched = [i for i, found in enumerate(options) if len(found) > 1]
    chosen, first_runs, selections = list(arms), {}, []
    if searched:
        grid = [(option, first) for i in searched for option in options[i]]
        scored = iter(run_plan(f"{name} (selection)", grid, scale, workdir, log, inspect, True))
        tried = {i: [next(scored) for _ in options[i]] for i in searched}
        # A best rate at the grid's edge may not be the best: one more step outward.
        edges = {i: edge for i in searched if (edge := _beyond(arms[i], tried[i], scale))}
        if edges:
            plan = [(edge, first) for edge in edges.values()]
            more = run_plan(
                f"{name} (selection, beyond the grid)", plan, scale, workdir, log, inspect, True
            )
            for i, run in zip(edges, more, strict=True):
                tried[i].append(run)
        for i in searched:
            arm, runs = arms[i], tried[i]
            best = _best(arm, runs)
            rate = best.settings["learning_rate"]
            chosen[i] = _at_rate(arm, rate)
            first_runs[i] = best  # the first seed's run of the chosen rate: not trained again
            metric = primary_metric(arm.task)
            candidates = [
                {
                    "learning_rate": r.settings["learning_rate"],
                    "validation": r.validation[metric],
                    "seconds": r.train_seconds + r.eval_seconds,
                }
                for r in runs
            ]
            selections.append(Selection(arm.label, arm.task, metric, candidates, rate))
    needed = [
        (i, seed)
        for seed in seeds
        for i in range(len(arms))
        if not (seed == first and i in first_runs)
    ]
    trained = run_plan(
        name, [(chosen[i], seed) for i, seed in needed], scale, workdir, log, inspect
    )
    by_run = dict(zip(needed, trained, strict=True))
    results = [
        first_runs[i] if seed == first and i in first_runs else by_run[(i, seed)]
        for seed in seeds
        for i in range(len(arms))
    ]
    return Runs(results, selections)


def _best(arm: Arm, runs: Sequence[RunResult]) -> RunResult:
    """The best validation score; on a tie, the rate nearest the method's own."""
    metric = primary_metric(arm.task)
    return max(runs, key=lambda r: (r.validation[metric], -_distance(r, arm)))


def _beyond(arm: Arm, runs: Sequence[RunResult], scale: Scale) -> Arm | None:
    """The arm one grid step past the grid's edge when the best rate sits on that edge
    (None when it lies inside, or the grid is too short to have a step)."""
    factors = sorted(scale.for_task(arm.task).lr_grid)
    if len(factors) < 3:
        return None
    rates = sorted(r.settings["learning_rate"] for r in runs)
    rate = _best(arm, runs).settings["learning_rate"]
    if rate == rates[-1]:
        rate *= factors[-1] / factors[-2]
    elif rate == rates[0]:
        rate *= factors[0] / factors[1]
    else:
        return None
    return _at_rate(arm, rate)


def _candidates(arm: Arm, scale: Scale) -> list[Arm]:
    """The arm at every learning rate of the scale's grid (just itself without a grid)."""
    if len(scale.lr_grid) < 2:
        return [arm]
    return [_at_rate(arm, _own_rate(arm) * factor) for factor in scale.lr_grid]


def _at_rate(arm: Arm, rate: float) -> Arm:
    return replace(arm, settings={**arm.settings, "learning_rate": rate})


def _own_rate(arm: Arm) -> float:
    """The method's learning rate (``settings.LEARNING_RATES``) unless the arm sets one."""
    method = arm.settings.get("method", "lora")
    return arm.settings.get("learning_rate", LEARNING_RATES.get(method, 2e-3))


def _distance(run: RunResult, arm: Arm) -> float:
    return abs(math.log(run.settings["learning_rate"] / _own_rate(arm)))


@contextlib.contextmanager
def torch_threads(count: int | None):
    """PyTorch's intra-op threads set to ``count`` inside the block (None: left as they are).

    On a machine that other jobs share, several threads wait for each other at every
    operation: on the 2-core build machine, busy, one thread ran a MiniLM nli training run
    20× faster than two (9 s against 180 s for 40 steps), and a SmolLM2 forward 10× faster.
    """
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
