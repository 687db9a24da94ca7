"""``loralab reproduce low-data``: FT, PreEmbed, PreLayer and LoRA with 100 / 1k / 10k
training examples (Table 16, finding 4: LoRA stays close to FT; prefix methods degrade
sharply with little data)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .methods import METHOD_ARMS
from .report import Report, format_mean_std, markdown_table, mean_std, raw_of, selection_section
from .runs import run_arms
from .settings import (
    LM_STANDARD,
    NLI_FULL_SELECTED,
    NLI_VALIDATION,
    Arm,
    Scale,
    primary_metric,
    selecting,
)

NAME = "low-data"
SUMMARY = (
    "FT, PreEmbed, PreLayer and LoRA with 100 / 1k / 10k training examples (nli; e2e in "
    "the standard mode)"
)
QUICK = selecting(
    Scale(steps=200, train_size=10_000, test_size=500, seeds=(0, 1), batch_size=8, quick=True),
    NLI_VALIDATION,
)
FULL = NLI_FULL_SELECTED
# On e2e with SmolLM2 (see methods.STANDARD), two sizes, each method's learning rate
# chosen from three per size: 24 selection runs, 4 beyond the grid and 8 more for the second
# seed took 47 min here (92.6 min of one-thread runs).
STANDARD = replace(LM_STANDARD, steps=30)
FULL_HOURS = 2.7  # estimated: 66 runs of 4–8 min with the selection (FT takes twice as long)
TASK = "nli"
STANDARD_TASK = "e2e"
SIZES = (100, 1_000, 10_000)
STANDARD_SIZES = (100, 1_000)  # 30 steps of 8 see 240 examples: more would not count
METHODS = ("FT", "PreEmbed", "PreLayer", "LoRA")


def run(scale: Scale, workdir: Path) -> Report:
    settings = dict(METHOD_ARMS)
    standard = scale.name == "standard"
    task, sizes = (STANDARD_TASK, STANDARD_SIZES) if standard else (TASK, SIZES)
    metric = primary_metric(task)
    # Every size trains the same number of steps: the small sets are seen many times.
    arms = [
        Arm(f"{m}, n={size}", task, {**settings[m], "train_size": size}, x=size)
        for size in sizes
        for m in METHODS
    ]
    results = run_arms(NAME, arms, scale, workdir)

    def values(method: str, size: int) -> list[float]:
        label = f"{method}, n={size}"
        return [r.metrics[metric] for r in results if r.label == label]

    rows = [[m, *[format_mean_std(values(m, n)) for n in sizes]] for m in METHODS]
    model = "SmolLM2-135M" if standard else "MiniLM-L6"
    body = (
        f"{task} {metric} ({model}), {scale.for_task(task).steps} steps for every size, mean "
        "± std over seeds.\n\n"
        + markdown_table(["Method", *[f"n={n:,}" for n in sizes]], rows)
        + selection_section(results)
    )

    def draw(figure) -> None:
        axis = figure.subplots()
        for method in METHODS:
            means = [mean_std(values(method, n)) for n in sizes]
            axis.errorbar(
                sizes,
                [m for m, _ in means],
                yerr=[s for _, s in means],
                marker="o",
                capsize=3,
                label=method,
            )
        axis.set_xscale("log")
        axis.set_xlabel("training examples")
        axis.set_ylabel(f"{task} {metric}")
        axis.legend()

    return Report(NAME, "Low-data regime", body, raw_of(results), draw, scale)
