"""``loralab reproduce scaling``: quality against trainable parameters (Figure 2, finding
5): prefix methods with more special tokens, LoRA with a higher rank. The paper finds
prefix tuning non-monotonic (more tokens can hurt) and LoRA steady."""

from __future__ import annotations

from pathlib import Path

from .report import Report, markdown_table, mean_std, runs_as_dicts
from .runs import run_arms
from .settings import NLI_FULL, Arm, Scale

NAME = "scaling"
SUMMARY = "quality vs trainable parameters: PreEmbed/PreLayer tokens, LoRA rank (one figure)"
QUICK = Scale(steps=200, train_size=1000, test_size=500, seeds=(0, 1), batch_size=8, quick=True)
FULL = NLI_FULL
FULL_HOURS = 2.0  # estimated: 42 runs of 4–12 min (64 prefix tokens triple a sequence)
TASK = "nli"
ALPHA = 16  # the same α at every rank, as the paper (and ``ranks``)
FAMILIES = {
    "PreEmbed": [("preembed", {"prefix_length": n}) for n in (2, 8, 32, 64)],
    "PreLayer": [("prelayer", {"prefix_length": n}) for n in (1, 2, 4, 8)],
    "LoRA": [
        ("lora", {"r": r, "lora_alpha": ALPHA, "target_modules": ["q", "v"]})
        for r in (1, 2, 4, 8, 16, 64)
    ],
}


def _label(family: str, settings: dict) -> str:
    knob = f"r={settings['r']}" if "r" in settings else f"l_p={settings['prefix_length']}"
    return f"{family}, {knob}"


def run(scale: Scale, workdir: Path) -> Report:
    arms = [
        Arm(_label(family, settings), TASK, {"method": method, **settings})
        for family, variants in FAMILIES.items()
        for method, settings in variants
    ]
    results = run_arms(NAME, arms, scale, workdir)
    points: dict[str, list[tuple[int, float, float]]] = {}
    rows = []
    for family, variants in FAMILIES.items():
        for _, settings in variants:
            label = _label(family, settings)
            runs = [r for r in results if r.label == label]
            mean, std = mean_std([r.metrics["accuracy"] for r in runs])
            points.setdefault(family, []).append((runs[0].trainable, mean, std))
            rows.append([label, f"{runs[0].trainable:,}", f"{mean:.1f} ± {std:.1f}"])
    body = (
        "nli accuracy (MiniLM-L6) against trainable parameters, mean ± std over seeds.\n\n"
        + markdown_table(["Variant", "trainable", "accuracy"], rows)
    )

    def draw(figure) -> None:
        axis = figure.subplots()
        for family, values in points.items():
            xs, means, stds = zip(*values, strict=True)
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=family)
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters")
        axis.set_ylabel("nli accuracy")
        axis.legend()

    return Report(
        NAME,
        "Quality against trainable parameters",
        body,
        {"runs": runs_as_dicts(results)},
        draw,
        scale,
    )
