"""Experiments that continue an SFT adapter with another objective (DPO, GRPO) and
compare the two: each seed trains LoRA on the task with the experiments' recipe, then
continues that adapter with the second objective; both are scored on the same test split.

The two stages of a seed run in one worker process, the seeds side by side, one thread
each. The result store is not used: the second stage needs the first stage's adapter,
which the store does not keep.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers.utils import logging as transformers_logging

from . import settings as experiment_settings
from .runs import RUN_THREADS, RunResult, run_settings, say, start_worker, torch_threads
from .settings import DATA_SEED, Arm, Scale

Score = Callable[[Any, Any, int], dict[str, float]]
"""``score(model, tokenizer, test_size)``: more metrics for a trained model, beside the
task's own; a module-level function (a worker process imports it)."""


@dataclass(frozen=True)
class Stages:
    """What one seed runs: SFT on ``task``, then ``second`` (TrainConfig fields) from its
    adapter, for ``second_steps`` steps (None: the scale's)."""

    task: str
    first_label: str
    second_label: str
    second: dict[str, Any]
    second_steps: int | None = None
    score: Score | None = None
    first: dict[str, Any] = field(default_factory=dict)


def run_stages(name: str, stages: Stages, scale: Scale, workdir: Path) -> list[RunResult]:
    """Every seed's two runs, in seed order (the first stage's, then the second's)."""
    context = multiprocessing.get_context("spawn")
    quiet = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled())
    results: list[RunResult] = []
    workers = max(1, min(scale.jobs, len(scale.seeds)))
    model = experiment_settings.TASK_MODELS[stages.task]  # resolved here: tests point it
    jobs = [(stages, seed, scale, workdir, model) for seed in scale.seeds]
    if workers == 1:
        pairs = map(_seed, jobs)
    else:
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=start_worker, initargs=quiet
        )
        pairs = pool.map(_seed, jobs)
    try:
        for pair in pairs:
            for result in pair:
                shown = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items())
                say(f"{name}: {result.label}, seed {result.seed}: {shown}")
            results += pair
    finally:
        if workers > 1:
            pool.shutdown()
    return results


def _seed(job: tuple[Stages, int, Scale, Path, tuple[str, str]]) -> tuple[RunResult, RunResult]:
    stages, seed, scale, workdir, model = job
    with torch_threads(RUN_THREADS):
        arm = Arm(stages.first_label, stages.task, stages.first)
        first = _train_and_score(arm, seed, scale, workdir, stages.score, model)
        start = {"start_adapter": str(Path(first.settings["output_dir"]) / "adapter")}
        steps = {"max_steps": stages.second_steps} if stages.second_steps else {}
        arm = Arm(stages.second_label, stages.task, {**stages.second, **steps, **start})
        second = _train_and_score(arm, seed, scale, workdir, stages.score, model)
    return first, second


def _train_and_score(
    arm: Arm, seed: int, scale: Scale, workdir: Path, score: Score | None, model: tuple[str, str]
) -> RunResult:
    from ..evaluate import evaluate_task
    from ..tasks import get_task
    from ..training.config import TrainConfig
    from ..training.loop import train

    settings = run_settings(arm, seed, replace(scale, quantized_base=None), workdir, model)
    if "objective" in arm.settings and arm.settings["objective"] != "sft":
        settings["warmup_steps"] = max(1, settings["max_steps"] // 10)
    result = train(TrainConfig(**settings))
    task = get_task(arm.task)
    test = task.splits(seed=DATA_SEED, test_size=scale.test_size)["test"]
    evaluation = evaluate_task(result.model, result.tokenizer, task, test, batch_size=32)
    extra = score(result.model, result.tokenizer, scale.test_size) if score else {}
    return RunResult(
        label=arm.label,
        task=arm.task,
        seed=seed,
        metrics={**evaluation.metrics, **extra},
        trainable=result.trainable,
        total=result.total,
        train_seconds=result.seconds,
        eval_seconds=evaluation.seconds,
        settings=settings,
        extra={"history": _history(Path(settings["output_dir"]))},
    )


def _history(run_dir: Path) -> list[dict]:
    """The run's per-step log (the mean reward of a GRPO run's steps, for its figure)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    keep = ("step", "loss", "reward", "rewards/margins", "rollout_tokens_per_s")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: line[k] for k in keep if k in line} for line in lines if "loss" in line]


def values(results: list[RunResult], label: str, metric: str) -> list[float]:
    return [r.metrics[metric] for r in results if r.label == label]
