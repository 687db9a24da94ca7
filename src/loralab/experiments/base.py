"""What every experiment shares: the runs it trains and scores, seeds and statistics, and
the three outputs (a Markdown table, a JSON file of every raw number, a PNG figure).

An experiment is a list of *arms* (a task and the training settings that differ), each
trained and scored once per seed. Each run trains with ``train.train`` and scores with
``evaluate.evaluate_task`` on a test split that is the same for every arm and seed (the
data seed is fixed; the seed varies the initialisation, dropout and data order).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..io import json_writer, write_files_atomically

# The embedded model each built-in task runs on: the classifier for nli (the paper's
# RoBERTa/DeBERTa analogue), the causal LM for the generation tasks (its GPT-2/GPT-3).
TASK_MODELS = {
    "nli": ("minilm-l6", "classification"),
    "e2e": ("smollm2-135m", "causal-lm"),
    "sql": ("smollm2-135m", "causal-lm"),
}

# Learning rates per method, as the paper tunes them per method (Appendix D): methods
# that train few parameters from a zero or neutral start take larger steps.
LEARNING_RATES = {
    "full": 1e-4,
    "ft-top2": 2e-4,
    "bitfit": 2e-3,
    "preembed": 1e-2,
    "prelayer": 5e-3,
    "adapter-h": 2e-3,
    "adapter-l": 2e-3,
    "lora": 2e-3,
    "lora-pe": 2e-3,
    "adalora": 2e-3,
}
DATA_SEED = 0  # every arm and seed sees the same examples and the same test split


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

    def with_seeds(self, count: int | None) -> Scale:
        if count is None:
            return self
        return replace(self, seeds=tuple(range(count)))  # keeps a subclass

    def describe(self) -> str:
        """One line for the report: what was run, at what size."""
        return (
            f"{self.steps} steps × batch {self.batch_size}, {self.train_size} training "
            f"examples, {self.test_size} test examples, seeds {list(self.seeds)}"
        )


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


def kept_parameters(model) -> int | None:
    """AdaLoRA's parameters after pruning: a kept triplet holds d + k + 1 numbers."""
    from ..methods.adalora import svd_factors

    factors = svd_factors(model)
    if not factors:
        return None
    return sum(f.rank * (f.P.shape[0] + f.Q.shape[1] + 1) for f in factors.values())


def train_and_score(
    arm: Arm,
    seed: int,
    scale: Scale,
    workdir: Path,
    inspect: Callable[[RunResult, Any], None] | None = None,
) -> RunResult:
    """Train ``arm`` with ``seed`` at ``scale`` and score it on the task's test split;
    ``inspect(run, model)`` may read more from the trained model."""
    from ..evaluate import evaluate_task
    from ..tasks import get_task
    from ..train import TrainConfig, train

    model_name, kind = TASK_MODELS[arm.task]
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
    kept = kept_parameters(result.model)
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
        final_trainable=result.trainable if kept is None else kept,
    )
    if inspect is not None:
        inspect(run, result.model)
    return run


def run_arms(
    name: str,
    arms: Sequence[Arm],
    scale: Scale,
    workdir: Path,
    log: Callable[[str], None] = print,
    inspect: Callable[[RunResult, Any], None] | None = None,
) -> list[RunResult]:
    """Every arm with every seed, with one progress line per run."""
    results = []
    total = len(arms) * len(scale.seeds)
    for seed in scale.seeds:  # seeds outermost: a cut-short run still covers every arm
        for arm in arms:
            started = time.perf_counter()
            run = train_and_score(arm, seed, scale, workdir, inspect)
            results.append(run)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in run.metrics.items())
            log(
                f"[{len(results)}/{total}] {name}: {arm.label} on {arm.task}, seed {seed}: "
                f"{shown} ({time.perf_counter() - started:.0f} s)"
            )
    return results


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
    cores = torch.get_num_threads()
    return (
        f"{platform.processor() or platform.machine()}, {cores} threads, torch "
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
    "format_mean_std",
    "markdown_table",
    "mean_std",
    "run_arms",
    "train_and_score",
    "write_report",
]
