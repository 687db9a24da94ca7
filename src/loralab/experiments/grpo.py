"""``loralab reproduce grpo``: GRPO on sql with its verifiable reward (the generated query
run on the example's SQLite database, 1 where it returns the gold query's rows) after
supervised fine-tuning, against the SFT adapter alone (issue 33's goal; beyond the
paper).

Each seed trains LoRA on sql with the experiments' recipe, then continues that adapter
with GRPO (``after_sft.py``); both are scored by execution accuracy on the same test
split. The figure shows each GRPO step's mean reward.
"""

from __future__ import annotations

from pathlib import Path

from .after_sft import Stages, run_stages, values
from .report import Report, format_mean_std, markdown_table, mean_std, runs_as_dicts
from .runs import RunResult
from .settings import Scale

NAME = "grpo"
SUMMARY = "GRPO on sql's execution reward after SFT, against the SFT adapter alone"
QUICK = Scale(steps=40, train_size=1000, test_size=64, seeds=(0, 1), batch_size=8)
FULL = Scale(steps=200, train_size=2000, test_size=200, seeds=(0, 1, 2), batch_size=8)
FULL_HOURS = 4.0  # estimated: 3 seeds × (200 SFT steps of ~5 s + 100 GRPO steps of ~90 s)
SFT, GRPO = "SFT", "SFT + GRPO"
# A GRPO step: 4 prompts × G = 8 completions of up to 32 tokens (sql queries: at most 27),
# TRL's defaults otherwise (temperature 1, ε = 0.2, β = 0, the dapo aggregation).
GRPO_SETTINGS = {
    "objective": "grpo",
    "learning_rate": 2e-4,
    "batch_size": 4,
    "num_generations": 8,
    "max_new_tokens": 32,
}
GRPO_STEPS = {"quick": 20, "full": 100}


def run(scale: Scale, workdir: Path) -> Report:
    steps = GRPO_STEPS["quick" if scale.quick else "full"]
    stages = Stages("sql", SFT, GRPO, GRPO_SETTINGS, second_steps=steps)
    results = run_stages(NAME, stages, scale, workdir)
    raw = {"runs": runs_as_dicts(results)}
    return Report(NAME, SUMMARY, _body(results, steps), raw, _draw(results), scale)


def _body(results: list[RunResult], steps: int) -> str:
    rows = []
    for label in (SFT, GRPO):
        accuracy = format_mean_std(values(results, label, "execution_accuracy"))
        exact = format_mean_std(values(results, label, "exact_match"))
        rows.append([label, accuracy, exact])
    rewards = [
        [entry["reward"] for entry in r.extra.get("history", []) if "reward" in entry]
        for r in results
        if r.label == GRPO
    ]
    first = [run[0] for run in rewards if run]
    last = [sum(run[-5:]) / len(run[-5:]) for run in rewards if run]
    return (
        f"Mean ± std over seeds. SFT: LoRA on sql; SFT + GRPO: {steps} more steps of GRPO "
        f"from that adapter ({GRPO_SETTINGS}), rewarded by execution match. Mean reward of "
        f"a step's completions: first step {format_mean_std(first, 2)}, last five "
        f"{format_mean_std(last, 2)}.\n\n"
        + markdown_table(["Adapter", "execution accuracy", "exact match"], rows)
    )


def _draw(results: list[RunResult]):
    def draw(figure) -> None:
        left, right = figure.subplots(1, 2)
        stats = [mean_std(values(results, label, "execution_accuracy")) for label in (SFT, GRPO)]
        left.bar([SFT, GRPO], [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
        left.set_ylabel("sql execution accuracy")
        for run in results:
            if run.label != GRPO:
                continue
            history = [(e["step"], e["reward"]) for e in run.extra.get("history", [])]
            if history:
                right.plot(*zip(*history, strict=True), label=f"seed {run.seed}")
        right.set_xlabel("GRPO step")
        right.set_ylabel("mean reward")
        right.legend()

    return draw


__all__ = ["GRPO", "NAME", "SFT", "run"]
