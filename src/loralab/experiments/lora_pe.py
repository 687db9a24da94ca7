"""``loralab reproduce lora-pe``: LoRA+PE against LoRA and PreEmbed (finding 6: combining
LoRA with prefix-embedding tuning can add a little on some tasks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .methods import METHOD_ARMS
from .report import Report, format_mean_std, markdown_table, mean_std, raw_of, selection_section
from .runs import run_arms
from .settings import (
    LM_FULL_SELECTED,
    NLI_FULL_SELECTED,
    NLI_VALIDATION,
    Arm,
    Scale,
    primary_metric,
    selecting,
)

NAME = "lora-pe"
SUMMARY = "LoRA+PE against LoRA and PreEmbed"
QUICK = selecting(
    Scale(steps=300, train_size=1000, test_size=500, seeds=(0, 1, 2), batch_size=8, quick=True),
    NLI_VALIDATION,
)
FULL = replace(NLI_FULL_SELECTED, per_task=(("e2e", LM_FULL_SELECTED),))
# estimated, with the selection: 17 nli runs of about 5 min, 17 e2e runs of about 18 min
FULL_HOURS = 3.2
QUICK_TASKS = ("nli",)
FULL_TASKS = ("nli", "e2e")
METHODS = ("PreEmbed", "LoRA", "LoRA+PE")


def run(scale: Scale, workdir: Path) -> Report:
    tasks = QUICK_TASKS if scale.quick else FULL_TASKS
    settings = dict(METHOD_ARMS)
    arms = [Arm(m, task, settings[m]) for task in tasks for m in METHODS]
    results = run_arms(NAME, arms, scale, workdir)

    def values(method: str, task: str) -> list[float]:
        return [
            r.metrics[primary_metric(task)] for r in results if r.label == method and r.task == task
        ]

    rows = []
    for method in METHODS:
        trainable = next(r.trainable for r in results if r.label == method)
        rows.append(
            [method, f"{trainable:,}", *[format_mean_std(values(method, t)) for t in tasks]]
        )
    header = ["Method", "trainable", *[f"{t} {primary_metric(t)}" for t in tasks]]
    body = "Mean ± std over seeds.\n\n" + markdown_table(header, rows) + selection_section(results)

    def draw(figure) -> None:
        axes = figure.subplots(1, len(tasks), squeeze=False)[0]
        for axis, task in zip(axes, tasks, strict=True):
            stats = [mean_std(values(m, task)) for m in METHODS]
            axis.bar(METHODS, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
            axis.set_ylabel(f"{task} {primary_metric(task)}")

    return Report(NAME, "LoRA+PE", body, raw_of(results), draw, scale)
