"""``loralab reproduce adalora``: AdaLoRA against LoRA at the same final budget.

AdaLoRA starts every matrix at rank ``init_r`` and prunes to an average of ``target_r``
per matrix on its cubic schedule; LoRA trains rank ``target_r`` everywhere from the start.
Both adapt W_q, W_k, W_v and W_o, so at the end both hold the same number of rank-one
directions; the table gives the parameters each keeps, the task metrics over seeds, and
how AdaLoRA spread its ranks (mean final rank per weight type).
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    Arm,
    Report,
    Scale,
    format_mean_std,
    markdown_table,
    mean_std,
    run_arms,
    runs_as_dicts,
)

NAME = "adalora"
SUMMARY = "AdaLoRA against LoRA at the same final parameter budget, on nli and sql"
QUICK = Scale(steps=60, train_size=1000, test_size=200, seeds=(0, 1), batch_size=16, quick=True)
FULL = Scale(steps=300, train_size=2000, test_size=200, seeds=(0, 1, 2), batch_size=16)
FULL_HOURS = 3.0
QUICK_TASKS = ("nli",)
FULL_TASKS = ("nli", "sql")
METRIC = {"nli": "accuracy", "sql": "execution_accuracy", "e2e": "bleu"}
TARGETS = ["q", "k", "v", "o"]
INIT_R, TARGET_R = 8, 2


def arms(tasks, steps: int) -> list[Arm]:
    schedule = {
        "adalora_tinit": steps // 10,
        "adalora_tfinal": steps // 5,
        "adalora_delta_t": max(1, steps // 20),
    }
    result = []
    for task in tasks:
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


def run(scale: Scale, workdir: Path) -> Report:
    # Tasks: the quick mode keeps to nli on MiniLM (two tasks on SmolLM2 do not fit 15 min).
    tasks = QUICK_TASKS if scale.quick else FULL_TASKS
    ranks: dict[tuple[str, int], dict[str, int]] = {}

    def keep_ranks(run, model) -> None:
        from ..methods.adalora_report import final_ranks

        if run.settings["method"] == "adalora":
            ranks[(run.task, run.seed)] = final_ranks(model)

    results = run_arms(NAME, arms(tasks, scale.steps), scale, workdir, inspect=keep_ranks)
    labels = [arm.label for arm in arms(tasks[:1], scale.steps)]
    rows = []
    for label in labels:
        row = [label]
        for task in tasks:
            runs = [r for r in results if r.label == label and r.task == task]
            row += [
                f"{runs[0].final_trainable:,}",
                format_mean_std([r.metrics[METRIC[task]] for r in runs]),
            ]
        rows.append(row)
    header = ["Method", *[h for t in tasks for h in (f"{t} parameters kept", METRIC[t])]]
    spread = []
    for (task, seed), by_module in sorted(ranks.items()):
        per_type: dict[str, list[int]] = {}
        for module, rank in by_module.items():
            per_type.setdefault(module.rsplit(".", 1)[-1], []).append(rank)
        spread.append(
            [task, str(seed), *[f"{sum(v) / len(v):.2f}" for _, v in sorted(per_type.items())]]
        )
    types = sorted({m.rsplit(".", 1)[-1] for r in ranks.values() for m in r})
    body = (
        f"Mean ± std over seeds; W_q, W_k, W_v, W_o; AdaLoRA prunes from r={INIT_R} to an "
        f"average of {TARGET_R} (tinit = 10%, tfinal = 20% of the steps).\n\n"
        + markdown_table(header, rows)
        + "\n\n## Where AdaLoRA put its budget: mean final rank per weight type\n\n"
        + markdown_table(["Task", "seed", *types], spread)
    )

    def draw(figure) -> None:
        axes = figure.subplots(1, len(tasks), squeeze=False)[0]
        for axis, task in zip(axes, tasks, strict=True):
            stats = [
                mean_std(
                    [
                        r.metrics[METRIC[task]]
                        for r in results
                        if r.label == label and r.task == task
                    ]
                )
                for label in labels
            ]
            axis.bar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
            axis.set_ylabel(f"{task} {METRIC[task]}")

    raw = {
        "runs": runs_as_dicts(results),
        "final_ranks": {f"{t}/seed{s}": r for (t, s), r in ranks.items()},
    }
    return Report(NAME, "AdaLoRA against LoRA", body, raw, draw, scale)
