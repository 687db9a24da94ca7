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
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from . import settings as experiment_settings
from .settings import DATA_SEED, LEARNING_RATES, RUN_THREADS, Arm, Scale


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


Inspect = Callable[["RunResult", Any], "dict[str, Any] | None"]
"""Reads more from a trained model: ``inspect(run, model)`` returns ``run.extra``. It runs in
the run's process, so it is a module-level function (a worker process imports it)."""


def train_and_score(
    arm: Arm,
    seed: int,
    scale: Scale,
    workdir: Path,
    inspect: Inspect | None = None,
    model: tuple[str, str] | None = None,
) -> RunResult:
    """Train ``arm`` with ``seed`` at ``scale`` and score it on the task's test split.

    ``model`` is the (name, kind) to train, by default ``settings.TASK_MODELS[arm.task]``."""
    from ..evaluate import evaluate_task
    from ..methods import get_method
    from ..tasks import get_task
    from ..train import train
    from ..train_config import TrainConfig

    model_name, kind = model or experiment_settings.TASK_MODELS[arm.task]
    method = arm.settings.get("method", "lora")
    settings = {
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
        "learning_rate": LEARNING_RATES.get(method, 2e-3),
        "lora_dropout": 0.0,
        "eval_every": 0,
        "save_every": 0,
        "progress": False,
        "output_dir": str(workdir / f"{_slug(arm.label)}-{arm.task}-seed{seed}"),
        **arm.settings,
    }
    result = train(TrainConfig(**settings))
    task = get_task(arm.task)
    test = task.splits(seed=DATA_SEED, test_size=scale.test_size)["test"]
    evaluation = evaluate_task(result.model, result.tokenizer, task, test, batch_size=32)
    final = get_method(method).final_trainable
    run = RunResult(
        label=arm.label,
        task=arm.task,
        seed=seed,
        metrics=evaluation.metrics,
        trainable=result.trainable,
        total=result.total,
        train_seconds=result.seconds,
        eval_seconds=evaluation.seconds,
        settings=settings,
        final_trainable=result.trainable if final is None else final(result.model),
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


def _run_job(job: _Job) -> RunResult:
    with torch_threads(RUN_THREADS):
        return train_and_score(job.arm, job.seed, job.scale, job.workdir, job.inspect, job.model)


def run_plan(
    name: str,
    plan: Sequence[tuple[Arm, int]],
    scale: Scale,
    workdir: Path,
    log: Callable[[str], None] = print,
    inspect: Inspect | None = None,
) -> list[RunResult]:
    """Every (arm, seed) of ``plan``, ``scale.jobs`` at a time, with one line per finished
    run; the results come back in the plan's order."""
    jobs = [
        _Job(
            arm,
            seed,
            scale.for_task(arm.task),
            workdir,
            experiment_settings.TASK_MODELS[arm.task],
            inspect,
        )
        for arm, seed in plan
    ]
    results: list[RunResult | None] = [None] * len(jobs)
    finished = 0

    def done(run: RunResult) -> None:
        nonlocal finished
        finished += 1
        shown = ", ".join(f"{k} {v:.2f}" for k, v in run.metrics.items())
        log(
            f"[{finished}/{len(jobs)}] {name}: {run.label} on {run.task}, seed {run.seed}: "
            f"{shown} ({run.train_seconds + run.eval_seconds:.0f} s)"
        )

    workers = min(scale.jobs, len(jobs))
    if workers <= 1:
        for index, job in enumerate(jobs):
            results[index] = _run_job(job)
            done(results[index])
        return results
    # spawn, not fork: a fork of a process whose PyTorch threads have started can hang.
    context = multiprocessing.get_context("spawn")
    quiet = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled())
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=quiet
    ) as pool:
        futures = {pool.submit(_run_job, job): index for index, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done(results[futures[future]])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the runs in flight still finish
            raise
    return results


def _start_worker(verbosity: int, progress_bars: bool) -> None:
    """A worker logs as its parent does (the CLI turns Transformers' load bars off), and
    ends with it: a parent killed outright leaves no runs training for nobody (Linux)."""
    transformers_logging.set_verbosity(verbosity)
    if not progress_bars:
        transformers_logging.disable_progress_bar()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_arms(
    name: str,
    arms: Sequence[Arm],
    scale: Scale,
    workdir: Path,
    log: Callable[[str], None] = print,
    inspect: Inspect | None = None,
) -> list[RunResult]:
    """Every arm with every seed (seeds outermost: a cut-short run still covers every arm)."""
    plan = [(arm, seed) for seed in scale.seeds for arm in arms]
    return run_plan(name, plan, scale, workdir, log, inspect)


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
