"""What every experiment shares: the runs it trains and scores, seeds and statistics, and
the three outputs (a Markdown table, a JSON file of every raw number, a PNG figure).

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
import datetime
import math
import multiprocessing
import os
import platform
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from ..atomic_write import json_writer, write_files_atomically

# The embedded model each built-in task runs on: the classifier for nli (the paper's
# RoBERTa/DeBERTa analogue), the causal LM for the generation tasks (its GPT-2/GPT-3).
TASK_MODELS = {
    "nli": ("minilm-l6", "classification"),
    "e2e": ("smollm2-135m", "causal-lm"),
    "sql": ("smollm2-135m", "causal-lm"),
}

# Learning rates per method, as the paper tunes them per method (Appendix D): methods
# that train few parameters from a zero or neutral start take larger steps. Checked on nli
# (MiniLM, 250–300 steps of batch 8): LoRA 66.5 and 67.0 (two seeds) at 1e-3, 64.5 and
# 67.0 at 2e-3, chance (33.5) at 5e-3; at 2e-3 some runs fell to chance and stayed there
# (all four weights at r = 4, LoRA+PE), which none did at 1e-3. BitFit 69.5 at 2e-3,
# chance at 1e-2. AdaLoRA starts from P, Q of N(0, 0.02) and Λ = 0, a product of three
# small factors that 2e-3 left at chance (34.5, two seeds) and 5e-3 took to 67.5.
LEARNING_RATES = {
    "full": 1e-4,
    "ft-top2": 2e-4,
    "bitfit": 2e-3,
    "preembed": 1e-2,
    "prelayer": 5e-3,
    "adapter-h": 2e-3,
    "adapter-l": 2e-3,
    "lora": 1e-3,
    "lora-pe": 1e-3,
    "adalora": 5e-3,
}
DATA_SEED = 0  # every arm and seed sees the same examples and the same test split
RUN_THREADS = 1  # every run trains on one thread, whatever the number of jobs


@dataclass(frozen=True)
class Scale:
    """How big the runs of an experiment are (``--quick`` or the full mode)."""

    steps: int
    train_size: int
    test_size: int
    seeds: tuple[int, ...]
    batch_size: int = 8
    max_length: int = 96
    quick: bool = False
    """The ``--quick`` mode: an experiment may also run fewer tasks in it."""
    jobs: int = 1
    """Runs trained side by side, each in a process of its own on one thread (``--jobs``):
    the time changes, the numbers do not."""
    per_task: tuple[tuple[str, Scale], ...] = ()
    """Tasks that run at a size of their own: a task on the 135M-parameter causal LM takes
    some 30× longer a step than nli on MiniLM. Their seeds, jobs and mode are this scale's."""

    def with_seeds(self, count: int | None) -> Scale:
        if count is None:
            return self
        return replace(self, seeds=tuple(range(count)))  # keeps a subclass

    def for_task(self, task: str) -> Scale:
        """The scale ``task``'s runs train and score at."""
        own = dict(self.per_task).get(task)
        if own is None:
            return self
        return replace(own, seeds=self.seeds, jobs=self.jobs, quick=self.quick, per_task=())

    def describe(self) -> str:
        """One line for the report: what was run, at what size."""
        sizes = self._size()
        for task, own in self.per_task:
            sizes += f"; {task}: {own._size()}"
        return (
            f"{sizes}; seeds {list(self.seeds)}; "
            f"{self.jobs} job{'s' if self.jobs != 1 else ''} of one thread"
        )

    def _size(self) -> str:
        return (
            f"{self.steps} steps × batch {self.batch_size}, {self.train_size} training "
            f"examples, {self.test_size} test examples"
        )


# The sizes of a run on the embedded causal LM (e2e, sql on SmolLM2-135M), in an
# experiment's per_task. Measured on the 2-core build machine, one thread a run, two runs
# side by side: 4.7 s a step of batch 8 (MiniLM on nli: 0.16 s, full fine-tuning 0.3 s),
# and about 25 s to score 64 sql or e2e test examples. A quick run: 40 steps, about 4 min.
LM_QUICK = Scale(steps=40, train_size=1000, test_size=64, seeds=(0, 1), batch_size=8)
LM_FULL = Scale(steps=200, train_size=2000, test_size=200, seeds=(0, 1, 2), batch_size=8)


def default_jobs() -> int:
    """One job per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Arm:
    """One configuration an experiment compares: a row of its table."""

    label: str
    task: str
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    x: float | None = None  # where it sits on a figure's x axis, if it has one


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

    ``model`` is the (name, kind) to train, by default ``TASK_MODELS[arm.task]``."""
    from ..evaluate import evaluate_task
    from ..methods import get_method
    from ..tasks import get_task
    from ..train import train
    from ..train_config import TrainConfig

    model_name, kind = model or TASK_MODELS[arm.task]
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
        _Job(arm, seed, scale.for_task(arm.task), workdir, TASK_MODELS[arm.task], inspect)
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def metric_of(results: Sequence[RunResult], label: str, task: str, metric: str) -> list[float]:
    return [r.metrics[metric] for r in results if r.label == label and r.task == task]


def format_mean_std(values: Sequence[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {default_jobs()} cores, torch "
        f"{torch.__version__}, Python {platform.python_version()}"
    )


@dataclass
class Report:
    """An experiment's outputs before they are written."""

    name: str
    title: str
    body: str  # Markdown: the tables and what they show
    raw: dict[str, Any]  # every number, for the JSON file
    draw: Callable[[Any], None]  # draws the figure on a matplotlib Figure
    scale: Scale
    seconds: float = 0.0

    def markdown(self, command: str) -> str:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"# {self.title}\n\n"
            f"- Command: `{command}`\n"
            f"- Date: {date}; the run took {self.seconds / 60:.1f} min\n"
            f"- Machine: {machine_line()}\n"
            f"- Scale: {self.scale.describe()}\n\n"
            f"{self.body}\n"
        )


def write_report(report: Report, directory: Path, command: str | None = None) -> dict[str, Path]:
    """Write ``NAME.md``, ``NAME.json`` and ``NAME.png`` to ``directory``, all or none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    command = command or " ".join(["loralab", *sys.argv[1:]])
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / f"{report.name}.{kind}" for kind in ("md", "json", "png")}
    figure = plt.figure(figsize=(7, 4.5))
    try:
        report.draw(figure)
        figure.tight_layout()

        def save_png(path: str) -> None:
            figure.savefig(path, dpi=120, format="png")

        raw = {"experiment": report.name, "scale": asdict(report.scale), **report.raw}
        write_files_atomically(
            directory,
            {
                paths["md"].name: lambda p: Path(p).write_text(report.markdown(command)),
                paths["json"].name: json_writer(raw),
                paths["png"].name: save_png,
            },
        )
    finally:
        plt.close(figure)
    return paths


def runs_as_dicts(results: Sequence[RunResult]) -> list[dict]:
    return [asdict(r) for r in results]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


__all__ = [
    "Arm",
    "Report",
    "RunResult",
    "Scale",
    "default_jobs",
    "format_mean_std",
    "markdown_table",
    "mean_std",
    "run_arms",
    "run_plan",
    "train_and_score",
    "write_report",
]
