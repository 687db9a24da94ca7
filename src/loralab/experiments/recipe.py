"""``loralab reproduce recipe``: is LoRA's seed-dependent plateau on nli the training
recipe's rather than LoRA's?

In ``low-data --quick`` one LoRA seed of two at n = 10,000 never left the start (37.8 %
against 66.8 %). The first table trains that run on more seeds, once with the head at
LoRA's rate (the experiments' recipe before this check) and once with each change of the
recipe that could explain it: a longer warm-up, a smaller scale α/r, and the new
classifier head at a learning rate of its own. Half the learning rate is there for
comparison: what the learning-rate selection could find. A run counts as *stuck* when its
accuracy stays below ``STUCK_BELOW``, near the 33 % of guessing one class of three.

The head at 1e-2 removed the plateau, so every experiment now trains a classifier's head
at ``settings.HEAD_LEARNING_RATE``; the second table checks that change on every other
method, on the first two seeds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .methods import METHOD_ARMS
from .report import Report, format_mean_std, markdown_table, mean_std, raw_of
from .runs import Runs, run_arms
from .settings import HEAD_LEARNING_RATE, LEARNING_RATES, NLI_FULL, Arm, Scale

NAME = "recipe"
SUMMARY = "LoRA's plateau on nli against the recipe: warm-up, α/r, the head's learning rate"
# low-data --quick's setting at n = 10,000, where the plateau showed, on four seeds.
QUICK = Scale(
    steps=200, train_size=10_000, test_size=500, seeds=(0, 1, 2, 3), batch_size=8, quick=True
)
FULL = NLI_FULL.with_seeds(6)
FULL_HOURS = 3.0  # estimated: 68 runs of about 5 min, two side by side
TASK = "nli"
STUCK_BELOW = 45.0


def variants(scale: Scale) -> list[tuple[str, dict[str, Any]]]:
    """(label, TrainConfig fields) for each recipe tried; the first is the one used before."""
    rate = LEARNING_RATES["lora"]
    own = {"head_learning_rate": None}  # the head at the method's rate
    return [
        ("head at the method's rate (1e-3), warm-up 10 %, α/r = 2", own),
        ("warm-up 30 %", {**own, "warmup_steps": (3 * scale.steps) // 10}),
        ("α/r = 1 (α = 8)", {**own, "lora_alpha": 8}),
        ("head at 1e-4", {"head_learning_rate": rate / 10}),
        ("head at 1e-2", {"head_learning_rate": HEAD_LEARNING_RATE}),
        ("half the learning rate (5e-4)", {**own, "learning_rate": rate / 2}),
    ]


HEAD_OPTIONS = (("own", {"head_learning_rate": None}), ("1e-2", {}))  # {}: the default now


def run(scale: Scale, workdir: Path) -> Report:
    settings = dict(METHOD_ARMS)
    arms = [Arm(label, TASK, {**settings["LoRA"], **c}) for label, c in variants(scale)]
    # Every other method with its head at its own rate and at the new one, two seeds.
    others = [
        Arm(f"{method}, head {head}", TASK, {**settings[method], **changes})
        for method in settings
        if method != "LoRA"
        for head, changes in HEAD_OPTIONS
    ]
    results = run_arms(NAME, arms, scale, workdir)
    checked = run_arms(NAME, others, replace(scale, seeds=scale.seeds[:2]), workdir)

    def values(label: str, runs=results) -> list[float]:
        return [r.metrics["accuracy"] for r in runs if r.label == label]

    def cells(scores: list[float]) -> list[str]:
        stuck = sum(score < STUCK_BELOW for score in scores)
        by_seed = ", ".join(f"{score:.1f}" for score in scores)
        return [by_seed, format_mean_std(scores), f"{stuck} of {len(scores)}"]

    rows = [[arm.label, *cells(values(arm.label))] for arm in arms]
    method_rows = [
        [
            method,
            *[
                cell
                for head, _ in HEAD_OPTIONS
                for cell in cells(values(f"{method}, head {head}", checked))[:2]
            ],
        ]
        for method in settings
        if method != "LoRA"
    ]
    rates = ", ".join(f"{m} {LEARNING_RATES[s['method']]:g}" for m, s in settings.items())
    body = (
        f"LoRA (r = 8 on q, v) on {TASK} with MiniLM-L6, {scale.steps} steps, "
        f"{scale.train_size:,} training examples; accuracy per seed "
        f"({', '.join(map(str, scale.seeds))}), mean ± std, and the runs stuck below "
        f"{STUCK_BELOW:g} %. Rows without a head rate train the head at LoRA's 1e-3.\n\n"
        + markdown_table(["Recipe", "accuracy by seed", "mean ± std", "stuck"], rows)
        + f"\n\nEvery other method at the same size, seeds {list(scale.seeds[:2])}: the head "
        f"at the method's own rate ({rates}) and at {HEAD_LEARNING_RATE:g}.\n\n"
        + markdown_table(
            ["Method", "head at its rate", "mean ± std", "head at 1e-2", "mean ± std"],
            method_rows,
        )
    )
    combined = Runs([*results, *checked], [*results.selections, *checked.selections])

    def draw(figure) -> None:
        axis = figure.subplots()
        for position, arm in enumerate(arms):
            scores = values(arm.label)
            axis.scatter([position] * len(scores), scores, color="tab:blue")
            mean, _ = mean_std(scores)
            axis.hlines(mean, position - 0.3, position + 0.3, color="black")
        axis.axhline(STUCK_BELOW, color="tab:red", linestyle=":", label="stuck below")
        axis.set_xticks(range(len(arms)), [arm.label.split(" (")[0].split(",")[0] for arm in arms])
        axis.tick_params(axis="x", labelrotation=20)
        axis.set_ylabel(f"LoRA's {TASK} accuracy")
        axis.legend()

    return Report(NAME, "LoRA's plateau and the recipe", body, raw_of(combined), draw, scale)
