"""``loralab reproduce low-data``: FT, PreEmbed, PreLayer and LoRA with 100 / 1k / 10k
training examples (Table 16, finding 4: LoRA stays close to FT; prefix methods degrade
sharply with little data)."""

from __future__ import annotations

from pathlib import Path

from .methods import METHOD_ARMS
from .report import Report, format_mean_std, markdown_table, mean_std, runs_as_dicts
from .runs import run_arms
from .settings import Arm, Scale

NAME = "low-data"
SUMMARY = "FT, PreEmbed, PreLayer and LoRA with 100 / 1k / 10k training examples (nli)"
QUICK = Scale(steps=200, train_size=10_000, test_size=500, seeds=(0, 1), batch_size=8, quick=True)
FULL = Scale(steps=1500, train_size=10_000, test_size=1000, seeds=(0, 1, 2), batch_size=8)
FULL_HOURS = 1.5  # estimated: 36 runs of 4–8 min (full fine-tuning takes twice as long)
TASK = "nli"
SIZES = (100, 1_000, 10_000)
METHODS = ("FT", "PreEmbed", "PreLayer", "LoRA")


def run(scale: Scale, workdir: Path) -> Report:
    settings = dict(METHOD_ARMS)
    # Every size trains the same number of steps: the small sets are seen many times.
    arms = [
        Arm(f"{m}, n={size}", TASK, {**settings[m], "train_size": size}, x=size)
        for size in SIZES
        for m in METHODS
    ]
    results = run_arms(NAME, arms, scale, workdir)

    def values(method: str, size: int) -> list[float]:
        label = f"{method}, n={size}"
        return [r.metrics["accuracy"] for r in results if r.label == label]

    rows = [[m, *[format_mean_std(values(m, n)) for n in SIZES]] for m in METHODS]
    body = (
        f"nli accuracy (MiniLM-L6), {scale.steps} steps for every size, mean ± std over "
        "seeds.\n\n" + markdown_table(["Method", *[f"n={n:,}" for n in SIZES]], rows)
    )

    def draw(figure) -> None:
        axis = figure.subplots()
        for method in METHODS:
            means = [mean_std(values(method, n)) for n in SIZES]
            axis.errorbar(
                SIZES,
                [m for m, _ in means],
                yerr=[s for _, s in means],
                marker="o",
                capsize=3,
                label=method,
            )
        axis.set_xscale("log")
        axis.set_xlabel("training examples")
        axis.set_ylabel("nli accuracy")
        axis.legend()

    return Report(NAME, "Low-data regime", body, {"runs": runs_as_dicts(results)}, draw, scale)
