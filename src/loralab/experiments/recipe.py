"""``loralab reproduce recipe``: is LoRA's seed-dependent plateau on nli the training
recipe's rather than LoRA's?

In ``low-data --quick`` one LoRA seed of two at n = 10,000 never left the start (37.8 %
against 66.8 %). This experiment trains that run on more seeds, once as every experiment
trains it and once with each change of the recipe that could explain it: a longer warm-up,
a smaller scale α/r, and the new classifier head at a learning rate of its own (it trains
at the method's rate otherwise). Half the learning rate is there for comparison: what the
learning-rate selection of the other experiments could find. A run counts as *stuck*
when its accuracy stays below ``STUCK_BELOW``, near the 33 % of guessing one class of three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .methods import METHOD_ARMS
from .report import Report, format_mean_std, markdown_table, mean_std, raw_of
from .runs import run_arms
from .settings import LEARNING_RATES, Arm, Scale

NAME = "recipe"
SUMMARY = "LoRA's plateau on nli against the recipe: warm-up, α/r, the head's learning rate"
# low-data --quick's setting at n = 10,000, where the plateau showed, on four seeds.
QUICK = Scale(
    steps=200, train_size=10_000, test_size=500, seeds=(0, 1, 2, 3), batch_size=8, quick=True
)
FULL = Scale(steps=1500, train_size=10_000, test_size=1000, seeds=tuple(range(6)), batch_size=8)
FULL_HOURS = 1.5  # estimated: 36 runs of about 5 min, two side by side
TASK = "nli"
STUCK_BELOW = 45.0


def variants(scale: Scale) -> list[tuple[str, dict[str, Any]]]:
    """(label, TrainConfig fields) for each recipe tried; the first is the one in use."""
    rate = LEARNING_RATES["lora"]
    return [
        ("as every experiment runs it (warm-up 10 %, α/r = 2, head at 1e-3)", {}),
        ("warm-up 30 %", {"warmup_steps": (3 * scale.steps) // 10}),
        ("α/r = 1 (α = 8)", {"lora_alpha": 8}),
        ("head at 1e-4", {"head_learning_rate": rate / 10}),
        ("head at 1e-2", {"head_learning_rate": rate * 10}),
        ("half the learning rate (5e-4)", {"learning_rate": rate / 2}),
    ]


def run(scale: Scale, workdir: Path) -> Report:
    lora = dict(METHOD_ARMS)["LoRA"]
    arms = [Arm(label, TASK, {**lora, **changes}) for label, changes in variants(scale)]
    results = run_arms(NAME, arms, scale, workdir)

    def values(label: str) -> list[float]:
        return [r.metrics["accuracy"] for r in results if r.label == label]

    rows = []
    for arm in arms:
        scores = values(arm.label)
        stuck = sum(score < STUCK_BELOW for score in scores)
        rows.append(
            [
                arm.label,
                ", ".join(f"{score:.1f}" for score in scores),
                format_mean_std(scores),
                f"{stuck} of {len(scores)}",
            ]
        )
    body = (
        f"LoRA (r = 8 on q, v) on {TASK} with MiniLM-L6, {scale.steps} steps, "
        f"{scale.train_size:,} training examples; accuracy per seed "
        f"({', '.join(map(str, scale.seeds))}), mean ± std, and the runs stuck below "
        f"{STUCK_BELOW:g} %.\n\n"
        + markdown_table(["Recipe", "accuracy by seed", "mean ± std", "stuck"], rows)
    )

    def draw(figure) -> None:
        axis = figure.subplots()
        for position, arm in enumerate(arms):
            scores = values(arm.label)
            axis.scatter([position] * len(scores), scores, color="tab:blue")
            mean, _ = mean_std(scores)
            axis.hlines(mean, position - 0.3, position + 0.3, color="black")
        axis.axhline(STUCK_BELOW, color="tab:red", linestyle=":", label="stuck below")
        axis.set_xticks(range(len(arms)), [arm.label.split(" (")[0] for arm in arms])
        axis.tick_params(axis="x", labelrotation=20)
        axis.set_ylabel(f"{TASK} accuracy")
        axis.legend()

    return Report(NAME, "LoRA's plateau and the recipe", body, raw_of(results), draw, scale)
