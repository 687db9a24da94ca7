"""``loralab reproduce ranks``: LoRA's rank and which weights it adapts (Tables 5–6).

Findings 2 and 3: quality is about the same for r = 1 … 64, and at a fixed budget of
trainable parameters, adapting more weight types at a smaller rank beats one weight type
at a larger rank (W_q at r = 8 vs W_q, W_v at r = 4 vs all four at r = 2 — the same
count for square projections).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .report import Report, format_mean_std, markdown_table, mean_std, runs_as_dicts
from .runs import run_arms
from .settings import LM_FULL, NLI_FULL, Arm, Scale, primary_metric

NAME = "ranks"
SUMMARY = "r ∈ {1, 2, 4, 8, 64} × weight types, and the fixed-budget comparison"
QUICK = Scale(steps=250, train_size=1000, test_size=500, seeds=(0, 1), batch_size=8, quick=True)
FULL = replace(NLI_FULL, per_task=(("sql", LM_FULL),))
# Estimated from the measured step times (base.LM_QUICK): 45 nli runs of about 4.5 min,
# 45 sql runs of about 17 min, two at a time.
FULL_HOURS = 8.0
QUICK_TASKS = ("nli",)
FULL_TASKS = ("nli", "sql")
RANKS = (1, 2, 4, 8, 64)
WEIGHT_TYPES = {"W_q": ["q"], "W_q, W_v": ["q", "v"], "W_q, W_k, W_v, W_o": ["q", "k", "v", "o"]}
BUDGET = (("W_q", 8), ("W_q, W_v", 4), ("W_q, W_k, W_v, W_o", 2))
# α is the same for every r, as in the paper (Sec. 4.1: α is "a constant in r"), so the
# update is scaled by α / r. With α = 2r instead (a scale of 2 at every rank) and a learning
# rate of 2e-3, r = 64 fell to chance on nli in four of six runs (quick mode): 64 rank-one
# directions each stepping at full size. With α = 16 and 1e-3, two r = 64 runs gave 66.0
# (W_q, W_v) and 66.5 (all four).
ALPHA = 16


def _label(types: str, r: int) -> str:
    return f"{types}, r={r}"


def arms(tasks) -> list[Arm]:
    """The rank × weight-type grid, plus the fixed-budget settings it does not hold."""
    chosen = [(types, r) for types in WEIGHT_TYPES for r in RANKS]
    chosen += [pair for pair in BUDGET if pair not in chosen]
    return [
        Arm(
            _label(types, r),
            task,
            {"method": "lora", "r": r, "lora_alpha": ALPHA, "target_modules": WEIGHT_TYPES[types]},
            x=r,
        )
        for task in tasks
        for types, r in chosen
    ]


def run(scale: Scale, workdir: Path) -> Report:
    tasks = QUICK_TASKS if scale.quick else FULL_TASKS
    results = run_arms(NAME, arms(tasks), scale, workdir)

    def values(task: str, types: str, r: int) -> list[float]:
        label = _label(types, r)
        return [
            x.metrics[primary_metric(task)] for x in results if x.label == label and x.task == task
        ]

    sections = []
    for task in tasks:
        header = ["Weight types", *[f"r={r}" for r in RANKS]]
        rows = [
            [types, *[format_mean_std(values(task, types, r)) for r in RANKS]]
            for types in WEIGHT_TYPES
        ]
        budget_rows = []
        for types, r in BUDGET:
            runs = [x for x in results if x.label == _label(types, r) and x.task == task]
            budget_rows.append(
                [types, str(r), f"{runs[0].trainable:,}", format_mean_std(values(task, types, r))]
            )
        sections.append(
            f"## {task}: {primary_metric(task)} by rank and weight types\n\n"
            + markdown_table(header, rows)
            + f"\n\n## {task}: the same budget of trainable parameters\n\n"
            + markdown_table(["Weight types", "r", "trainable", primary_metric(task)], budget_rows)
        )
    body = (
        f"LoRA with α = {ALPHA} at every rank (scale α/r), mean ± std over seeds; nli on "
        "MiniLM-L6, sql on SmolLM2-135M.\n\n" + "\n\n".join(sections)
    )

    def draw(figure) -> None:
        axes = figure.subplots(1, len(tasks), squeeze=False)[0]
        for axis, task in zip(axes, tasks, strict=True):
            for types in WEIGHT_TYPES:
                means = [mean_std(values(task, types, r)) for r in RANKS]
                axis.errorbar(
                    range(len(RANKS)),
                    [m for m, _ in means],
                    yerr=[s for _, s in means],
                    marker="o",
                    capsize=3,
                    label=types,
                )
            axis.set_xticks(range(len(RANKS)), [str(r) for r in RANKS])
            axis.set_xlabel("rank r")
            axis.set_ylabel(primary_metric(task))
            axis.set_title(task)
            axis.legend(fontsize=7)

    return Report(
        NAME, "LoRA's rank and weight types", body, {"runs": runs_as_dicts(results)}, draw, scale
    )
