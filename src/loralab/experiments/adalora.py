"""``loralab reproduce adalora``: AdaLoRA against LoRA at the same final budget.

AdaLoRA starts every matrix at rank ``init_r`` and prunes to an average of ``target_r``
per matrix on its cubic schedule; LoRA trains rank ``target_r`` everywhere from the start.
Both adapt W_q, W_k, W_v and W_o, so at the end both hold the same number of rank-one
directions; the table gives the parameters each keeps, the task metrics over seeds, and
how AdaLoRA spread its ranks (mean final rank per weight type).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..methods.adalora.report import layer_and_type
from . import settings as experiment_settings
from .report import Report, format_mean_std, markdown_table, mean_std, raw_of, selection_section
from .runs import run_arms
from .settings import (
    LM_FULL_SELECTED,
    LM_QUICK,
    NLI_FULL_SELECTED,
    Arm,
    Scale,
    primary_metric,
)

NAME = "adalora"
SUMMARY = "AdaLoRA against LoRA at the same final parameter budget, on nli and sql"
QUICK = Scale(
    steps=300,
    train_size=1000,
    test_size=500,
    seeds=(0, 1),
    batch_size=8,
    quick=True,
    per_task=(("sql", LM_QUICK),),
)
FULL = replace(NLI_FULL_SELECTED, per_task=(("sql", LM_FULL_SELECTED),))
# estimated, with the selection: 11 nli runs of about 5 min, 11 sql runs of about 18 min
FULL_HOURS = 2.2
TASKS = ("nli", "sql")
TARGETS = ["q", "k", "v", "o"]
INIT_R, TARGET_R = 8, 2


def arms(tasks, scale: Scale) -> list[Arm]:
    result = []
    for task in tasks:
        steps = scale.for_task(task).steps
        schedule = {
            "adalora_tinit": steps // 10,
            "adalora_tfinal": steps // 5,
            "adalora_delta_t": max(1, steps // 20),
        }
        result.append(
            Arm(
                f"LoRA r={TARGET_R}",
                task,
                {
                    "method": "lora",
                    "r": TARGET_R,
                    "lora_alpha": 2 * TARGET_R,
                    "target_modules": TARGETS,
                },
            )
        )
        result.append(
            Arm(
                f"AdaLoRA r={INIT_R}→{TARGET_R}",
                task,
                {
                    "method": "adalora",
                    "r": INIT_R,
                    "target_r": TARGET_R,
                    "lora_alpha": 2 * INIT_R,
                    "target_modules": TARGETS,
                    **schedule,
                },
            )
        )
    return result


def final_ranks_of(run, model) -> dict | None:
    """The rank AdaLoRA left each matrix (read in the run's own process)."""
    from ..methods.adalora.report import final_ranks

    return {"final_ranks": final_ranks(model)} if run.settings["method"] == "adalora" else None


def run(scale: Scale, workdir: Path) -> Report:
    tasks = TASKS
    results = run_arms(NAME, arms(tasks, scale), scale, workdir, inspect=final_ranks_of)
    ranks = {(r.task, r.seed): r.extra["final_ranks"] for r in results if r.extra}
    labels = [arm.label for arm in arms(tasks[:1], scale)]
    rows = []
    for label in labels:
        row = [label]
        for task in tasks:
            runs = [r for r in results if r.label == label and r.task == task]
            row += [
                f"{runs[0].final_trainable:,}",
                format_mean_std([r.metrics[primary_metric(task)] for r in runs]),
            ]
        rows.append(row)
    header = ["Method", *[h for t in tasks for h in (f"{t} parameters kept", primary_metric(t))]]
    spread = []
    for task in tasks:  # one table a task: the models name their weights differently
        by_seed = {seed: by_module for (t, seed), by_module in sorted(ranks.items()) if t == task}
        types = sorted({layer_and_type(m)[1] for by_module in by_seed.values() for m in by_module})
        rows_of_task = []
        for seed, by_module in by_seed.items():
            per_type: dict[str, list[int]] = {}
            for module, rank in by_module.items():
                per_type.setdefault(layer_and_type(module)[1], []).append(rank)
            means = [sum(per_type[t]) / len(per_type[t]) for t in types]
            rows_of_task.append([str(seed), *[f"{m:.2f}" for m in means]])
        spread.append(
            f"### {task} ({experiment_settings.TASK_MODELS[task][0]})\n\n"
            + markdown_table(["seed", *types], rows_of_task)
        )
    body = (
        f"Mean ± std over seeds; W_q, W_k, W_v, W_o; AdaLoRA prunes from r={INIT_R} to an "
        f"average of {TARGET_R} (tinit = 10%, tfinal = 20% of each task's steps).\n\n"
        + markdown_table(header, rows)
        + selection_section(results)
        + "\n\n## Where AdaLoRA put its budget: mean final rank per weight type\n\n"
        + "\n\n".join(spread)
    )

    def draw(figure) -> None:
        axes = figure.subplots(1, len(tasks), squeeze=False)[0]
        for axis, task in zip(axes, tasks, strict=True):
            stats = [
                mean_std(
                    [
                        r.metrics[primary_metric(task)]
                        for r in results
                        if r.label == label and r.task == task
                    ]
                )
                for label in labels
            ]
            axis.bar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
            axis.set_ylabel(f"{task} {primary_metric(task)}")

    raw = {
        **raw_of(results),
        "final_ranks": {f"{t}/seed{s}": r for (t, s), r in ranks.items()},
    }
    return Report(NAME, "AdaLoRA against LoRA", body, raw, draw, scale)
