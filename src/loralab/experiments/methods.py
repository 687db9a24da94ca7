"""``loralab reproduce methods``: every adaptation method on nli, e2e and sql.

The analogue of the paper's Tables 2–4: trainable parameters and each task's metrics, per
method, mean ± standard deviation over seeds. The settings follow the paper's choices
scaled down: LoRA on W_q and W_v (r = 8), adapters of bottleneck 8, PreEmbed with 10
prefix tokens, PreLayer with 4, FT-Top2 on the last two blocks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .report import Report, format_mean_std, markdown_table, raw_of, selection_section
from .runs import run_arms
from .settings import (
    LM_FULL_SELECTED,
    LM_STANDARD,
    NLI_FULL_SELECTED,
    NLI_VALIDATION,
    Arm,
    Scale,
    selecting,
)

NAME = "methods"
SUMMARY = "every method on nli, e2e and sql: trainable parameters and task metrics"
QUICK = selecting(
    Scale(steps=300, train_size=1000, test_size=500, seeds=(0, 1), batch_size=8, quick=True),
    NLI_VALIDATION,
)
FULL = replace(NLI_FULL_SELECTED, per_task=(("e2e", LM_FULL_SELECTED), ("sql", LM_FULL_SELECTED)))
# The paper's setting at a laptop's size: every method on e2e with SmolLM2 (the GPT-2 and
# GPT-3 generation tasks), each method's learning rate chosen from three on validation.
# Measured with two one-thread runs side by side: 3.2–3.9 s a step of batch 8 (FT 7.7 s),
# 12–19 s to score 32 examples; 27 selection runs, 7 beyond the grid and 9 more for the
# second seed took 64 min here (125.3 min of one-thread runs).
STANDARD = LM_STANDARD
# Estimated from the measured step times (settings.LM_QUICK), two runs at a time: per
# method and task 3 selection runs, about one beyond the grid in two, and 2 more seeds;
# nli runs of about 5 min, e2e and sql runs of about 18 min.
FULL_HOURS = 17.0
TASKS = ("nli", "e2e", "sql")
QUICK_TASKS = ("nli",)  # 9 methods × 2 seeds on SmolLM2 tasks take about 75 minutes
STANDARD_TASKS = ("e2e",)
METRICS = {"nli": ("accuracy",), "e2e": ("bleu", "rouge_l"), "sql": ("execution_accuracy",)}

METHOD_ARMS = (
    ("FT", {"method": "full"}),
    ("FT-Top2", {"method": "ft-top2", "top_layers": 2}),
    ("BitFit", {"method": "bitfit"}),
    ("PreEmbed", {"method": "preembed", "prefix_length": 10, "infix_length": 0}),
    ("PreLayer", {"method": "prelayer", "prefix_length": 4, "infix_length": 0}),
    ("Adapter^H", {"method": "adapter-h", "adapter_rank": 8}),
    ("Adapter^L", {"method": "adapter-l", "adapter_rank": 8}),
    ("LoRA", {"method": "lora", "r": 8, "target_modules": ["q", "v"]}),
    ("LoRA+PE", {"method": "lora-pe", "r": 8, "target_modules": ["q", "v"], "prefix_length": 10}),
)


def arms(tasks) -> list[Arm]:
    return [Arm(label, task, settings) for task in tasks for label, settings in METHOD_ARMS]


def run(scale: Scale, workdir: Path) -> Report:
    tasks = {"quick": QUICK_TASKS, "standard": STANDARD_TASKS}.get(scale.name, TASKS)
    results = run_arms(NAME, arms(tasks), scale, workdir)
    header = ["Method"]
    for task in tasks:
        header.append(f"{task} trainable")
        header += [f"{task} {metric}" for metric in METRICS[task]]
    rows = []
    for label, _ in METHOD_ARMS:
        row = [label]
        for task in tasks:
            runs = [r for r in results if r.label == label and r.task == task]
            row.append(f"{runs[0].trainable:,}" if runs else "—")
            for metric in METRICS[task]:
                row.append(format_mean_std([r.metrics[metric] for r in runs]))
        rows.append(row)
    models = "nli runs on the embedded MiniLM-L6 classifier, e2e and sql on SmolLM2-135M-Instruct."
    if scale.name == "standard":
        models = "The standard mode runs e2e, on SmolLM2-135M-Instruct."
    elif scale.quick:
        models = (
            "The quick mode runs nli only, on the embedded MiniLM-L6 classifier (the 36 runs "
            "on e2e and sql, on SmolLM2-135M-Instruct, would take about 75 minutes more)."
        )
    body = (
        f"Trainable parameters and test metrics (mean ± std over seeds). {models}\n\n"
        + markdown_table(header, rows)
        + selection_section(results)
    )

    def draw(figure) -> None:
        axes = figure.subplots(1, len(tasks), squeeze=False)[0]
        for axis, task in zip(axes, tasks, strict=True):
            metric = METRICS[task][0]
            for label, _ in METHOD_ARMS:
                runs = [r for r in results if r.label == label and r.task == task]
                if not runs:
                    continue
                values = [r.metrics[metric] for r in runs]
                axis.scatter([runs[0].trainable] * len(values), values, s=12)
                axis.annotate(label, (runs[0].trainable, sum(values) / len(values)), fontsize=6)
            axis.set_xscale("log")
            axis.set_xlabel("trainable parameters")
            axis.set_title(f"{task}: {metric}", fontsize=9)

    return Report(NAME, "The methods compared", body, raw_of(results), draw, scale)
