"""``loralab reproduce report``: one verdict per finding of the paper (and AdaLoRA's),
computed from what the experiments wrote.

It reads every ``NAME.json`` in a results folder, puts the measured numbers beside the
paper's and gives each finding a verdict — ``holds``, ``partly``, ``does not hold`` or
``not measured`` — by a rule written next to it. The rules compare means over seeds, and
a difference counts only when it is larger than its standard error (that of the
difference of two means, ``√(s₁²/n₁ + s₂²/n₂)``) and than one point of the metric, so
that neither a seed's luck nor a hair's breadth decides a verdict. The page is
``REPORT.md``, beside the experiments' own tables and figures.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..files.atomic_write import text_writer, write_files_atomically
from .report import markdown_table
from .settings import EXPERIMENT_TASKS, primary_metric

HOLDS, PARTLY, FAILS, UNMEASURED = "holds", "partly", "does not hold", "not measured"


@dataclass(frozen=True)
class Stat:
    """A metric's mean over seeds, its sample standard deviation and the seed count."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f}" if self.n > 1 else f"{self.mean:.1f}"


@dataclass(frozen=True)
class Verdict:
    finding: str
    paper: str
    measured: str
    rule: str
    verdict: str


MARGIN = 1.0
"""A difference smaller than this (points of accuracy, BLEU, …) never counts, however small
the seeds' spread: the paper calls 73.4 against 73.8 a match."""


def beats(a: Stat, b: Stat) -> bool:
    """``a`` above ``b`` by more than the margin of their difference."""
    return a.mean - b.mean > _margin(a, b)


def within(a: Stat, b: Stat) -> bool:
    """``a`` no lower than ``b`` by more than the margin of their difference."""
    return a.mean >= b.mean - _margin(a, b)


def _margin(a: Stat, b: Stat) -> float:
    """The standard error of the difference of the means, and at least ``MARGIN``."""
    return max(MARGIN, math.sqrt(a.std**2 / a.n + b.std**2 / b.n))


class Results:
    """The experiments' JSON files in one folder, and their metrics by arm."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.raw = {
            path.stem: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(directory.glob("*.json"))
        }

    def tasks(self, experiment: str) -> list[str]:
        runs = self.raw.get(experiment, {}).get("runs", [])
        return sorted({r["task"] for r in runs}, key=EXPERIMENT_TASKS.index)

    def stat(self, experiment: str, label: str, task: str) -> Stat | None:
        values = [
            r["metrics"][primary_metric(task)]
            for r in self.raw.get(experiment, {}).get("runs", [])
            if r["label"] == label and r["task"] == task
        ]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return Stat(statistics.fmean(values), std, len(values))

    def labels(self, experiment: str, task: str) -> list[str]:
        runs = self.raw.get(experiment, {}).get("runs", [])
        return list(dict.fromkeys(r["label"] for r in runs if r["task"] == task))

    def trainable(self, experiment: str, label: str, task: str) -> int | None:
        for r in self.raw.get(experiment, {}).get("runs", []):
            if r["label"] == label and r["task"] == task:
                return r["trainable"]
        return None


# -- the findings -----------------------------------------------------------------------------

Judged = list[tuple[str, str]]
"""What a finding's judge returns: (the measured numbers, the verdict), one per task."""


@dataclass(frozen=True)
class Finding:
    """One of the paper's findings: its numbers there, the rule, and who measures it."""

    name: str
    paper: str  # the paper's numbers (Hu et al., 2022; Zhang et al., 2023), as its tables say
    rule: str
    experiment: str
    judge: Callable[[Results], Judged]


def lora_against_the_methods(results: Results) -> Judged:
    judged = []
    for task in results.tasks("methods"):
        lora, ft = results.stat("methods", "LoRA", task), results.stat("methods", "FT", task)
        if lora is None or ft is None:
            continue
        others = {
            label: results.stat("methods", label, task)
            for label in results.labels("methods", task)
            if label not in ("FT", "LoRA", "LoRA+PE")
        }
        ratio = results.trainable("methods", "LoRA", task) / results.trainable(
            "methods", "FT", task
        )
        better = [label for label, stat in others.items() if beats(stat, lora)]
        measured = (
            f"{task} {primary_metric(task)}: LoRA {lora}, FT {ft} (LoRA trains "
            f"{ratio:.2%} of FT's parameters)"
        )
        if others:
            best = max(others, key=lambda label: others[label].mean)
            measured += f"; best other: {best} {others[best]}"
        measured += f"; above LoRA: {', '.join(better)}" if better else ""
        judged.append((measured, _both(within(lora, ft) and ratio < 0.01, not better)))
    return judged


QV = "W_q, W_v, r="  # the weight types whose ranks finding 2 compares, as the paper's Table 6


def stable_across_ranks(results: Results) -> Judged:
    judged = []
    for task in results.tasks("ranks"):
        labels = [label for label in results.labels("ranks", task) if label.startswith(QV)]
        if len(labels) < 2:
            continue
        stats = {label.rsplit("=", 1)[1]: results.stat("ranks", label, task) for label in labels}
        best = max(stats.values(), key=lambda s: s.mean)
        low = [r for r, s in stats.items() if not within(s, best)]
        measured = f"{task}: " + ", ".join(f"r={r} {s}" for r, s in stats.items())
        if low:
            measured += f"; below the best: r={', r='.join(low)}"
        judged.append((measured, HOLDS if not low else PARTLY if len(low) == 1 else FAILS))
    return judged


def more_weight_types(results: Results) -> Judged:
    judged = []
    for task in results.tasks("ranks"):
        single = results.stat("ranks", "W_q, r=8", task)
        others = [
            results.stat("ranks", label, task)
            for label in ("W_q, W_v, r=4", "W_q, W_k, W_v, W_o, r=2")
        ]
        if single is None or None in others:
            continue
        wins = sum(beats(other, single) for other in others)
        higher = all(other.mean > single.mean for other in others)
        measured = f"{task}: W_q r=8 {single}; W_q, W_v r=4 {others[0]}; all four r=2 {others[1]}"
        judged.append((measured, HOLDS if wins == 2 else PARTLY if wins == 1 or higher else FAILS))
    return judged


def low_data(results: Results) -> Judged:
    judged = []
    for task in results.tasks("low-data"):
        labels = results.labels("low-data", task)
        sizes = sorted({int(label.rsplit("=", 1)[1]) for label in labels})
        if len(sizes) < 2:
            continue

        def at(method: str, size: int, task: str = task) -> Stat:
            return results.stat("low-data", f"{method}, n={size}", task)

        small, large = sizes[0], sizes[-1]
        close = all(within(at("LoRA", n), at("FT", n)) for n in sizes)
        degrade = all(
            beats(at("LoRA", small), at(prefix, small))
            and at("LoRA", small).mean - at(prefix, small).mean
            > at("LoRA", large).mean - at(prefix, large).mean
            for prefix in ("PreEmbed", "PreLayer")
        )
        measured = f"{task}: " + "; ".join(
            f"n={n:,}: FT {at('FT', n)}, LoRA {at('LoRA', n)}, PreEmbed {at('PreEmbed', n)}, "
            f"PreLayer {at('PreLayer', n)}"
            for n in sizes
        )
        judged.append((measured, _both(close, degrade)))
    return judged


def prefix_size(results: Results) -> Judged:
    judged = []
    for task in results.tasks("scaling"):
        families: dict[str, list[tuple[int, Stat]]] = {}
        for label in results.labels("scaling", task):
            family, size = label.split(", ")
            families.setdefault(family, []).append(
                (int(size.split("=")[1]), results.stat("scaling", label, task))
            )
        if "LoRA" not in families:
            continue
        prefix_falls = any(_falls(families[f]) for f in ("PreEmbed", "PreLayer") if f in families)
        measured = f"{task}: " + "; ".join(
            f"{family}: " + ", ".join(f"{size} {stat}" for size, stat in sorted(points))
            for family, points in families.items()
        )
        judged.append((measured, _both(prefix_falls, not _falls(families["LoRA"]))))
    return judged


def _falls(points: list[tuple[int, Stat]]) -> bool:
    """Whether a larger size scores below a smaller one by more than the margin."""
    points = sorted(points)
    return any(beats(a, b) for i, (_, a) in enumerate(points) for _, b in points[i + 1 :])


def lora_with_prefix(results: Results) -> Judged:
    # The methods table has both arms too: where lora-pe did not run (the standard mode),
    # it is what measured them.
    source = next((e for e in ("lora-pe", "methods") if results.tasks(e)), "lora-pe")
    rows, verdict = [], FAILS
    for task in results.tasks(source):
        both = results.stat(source, "LoRA+PE", task)
        lora = results.stat(source, "LoRA", task)
        if both is None or lora is None:
            continue
        named = "" if source == "lora-pe" else f" ({source}.json)"
        rows.append(f"{task}{named}: LoRA {lora}, LoRA+PE {both}")
        if beats(both, lora):
            verdict = HOLDS
        elif both.mean > lora.mean and verdict == FAILS:
            verdict = PARTLY
    return [("; ".join(rows), verdict)] if rows else []


def latency(results: Results) -> Judged:
    raw = results.raw.get("latency")
    if not raw:
        return []
    summary = raw["summary"]
    shapes = list(summary)
    merged = {s: summary[s]["lora-merged"]["ratio_median"] for s in shapes}
    adapter = {s: summary[s]["adapter-h"]["ratio_median"] for s in shapes}
    measured = "; ".join(
        f"{s}: merged LoRA ×{merged[s]:.2f}, Adapter^H ×{adapter[s]:.2f}" for s in shapes
    )
    if not all(abs(m - 1) <= 0.05 for m in merged.values()):
        return [(measured, FAILS)]
    first, last = shapes[0], shapes[-1]
    slower = adapter[first] >= 1.10 and adapter[last] < adapter[first]
    return [(measured, HOLDS if slower else PARTLY)]


def subspace(results: Results) -> Judged:
    raw = results.raw.get("subspace")
    if not raw:
        return []
    phi = statistics.fmean(m["ranks"][0][0] for m in raw["modules"].values())
    at_init = statistics.fmean(m["ranks_init"][0][0] for m in raw["modules"].values())
    random = raw["random"]["ranks"]["mean"][0][0]
    factors = {
        int(r): statistics.median(entry["factor"] for entry in by_module.values())
        for r, by_module in raw["amplification"].items()
    }
    ranks = sorted(factors)
    overlap = phi > 0.5 and phi > 3 * random
    amplified = all(f > 1 for f in factors.values()) and factors[ranks[0]] == max(factors.values())
    measured = (
        f"φ(1, 1) = {phi:.2f} (at initialisation {at_init:.2f}, random {random:.3f}); "
        "amplification of W_q (median over layers): "
        + ", ".join(f"r={r} {factors[r]:.1f}" for r in ranks)
    )
    return [(measured, _both(overlap, amplified))]


def dpo_after_sft(results: Results) -> Judged:
    runs = results.raw.get("dpo", {}).get("runs", [])
    if not runs:
        return []

    def stat(label: str, metric: str) -> Stat:
        values = [r["metrics"][metric] for r in runs if r["label"] == label]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return Stat(statistics.fmean(values), std, len(values))

    if {r["label"] for r in runs} != {"SFT", "SFT + DPO"}:
        return []  # a run of the experiment that left one side out
    errors = {label: stat(label, "slot_errors") for label in ("SFT", "SFT + DPO")}
    ranked = {label: stat(label, "preference_accuracy") for label in ("SFT", "SFT + DPO")}
    bleu = {label: stat(label, "bleu") for label in ("SFT", "SFT + DPO")}
    measured = (
        f"slot errors / 100 MRs: SFT {errors['SFT']}, SFT + DPO {errors['SFT + DPO']}; "
        f"preference accuracy: {ranked['SFT']} → {ranked['SFT + DPO']}; "
        f"BLEU {bleu['SFT']} → {bleu['SFT + DPO']}"
    )
    fewer = beats(errors["SFT"], errors["SFT + DPO"])  # lower is better
    better = beats(ranked["SFT + DPO"], ranked["SFT"])
    return [(measured, _both(fewer, better))]


def grpo_after_sft(results: Results) -> Judged:
    runs = results.raw.get("grpo", {}).get("runs", [])
    if not runs:
        return []
    values = {
        label: [r["metrics"]["execution_accuracy"] for r in runs if r["label"] == label]
        for label in ("SFT", "SFT + GRPO")
    }
    if not all(values.values()):
        return []  # a run of the experiment that left one side out
    stats = {
        label: Stat(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for label, v in values.items()
    }
    sft, grpo = stats["SFT"], stats["SFT + GRPO"]
    measured = f"sql execution accuracy: SFT {sft}, SFT + GRPO {grpo}"
    verdict = HOLDS if beats(grpo, sft) else PARTLY if grpo.mean > sft.mean else FAILS
    return [(measured, verdict)]


def adalora_against_lora(results: Results) -> Judged:
    judged = []
    for task in results.tasks("adalora"):
        labels = results.labels("adalora", task)
        ada = next((label for label in labels if label.startswith("AdaLoRA")), None)
        lora = next((label for label in labels if label.startswith("LoRA")), None)
        if ada is None or lora is None:
            continue
        a, b = results.stat("adalora", ada, task), results.stat("adalora", lora, task)
        verdict = HOLDS if beats(a, b) else PARTLY if a.mean > b.mean else FAILS
        judged.append((f"{task}: {ada} {a}, {lora} {b}", verdict))
    return judged


_ONE_OF_TWO = f"{PARTLY}: one of the two; {FAILS}: neither"

FINDINGS = (
    Finding(
        "1. LoRA matches FT and beats the other methods",
        "GPT-3 175B (Table 4), WikiSQL / MNLI-m: FT 73.8 / 89.5 (175B parameters), LoRA "
        "73.4 / 91.7 (4.7M), Adapter^H 71.9 / 89.8 (7.1M), BitFit 71.3 / 91.0, PreLayer "
        "70.1 / 89.5, PreEmbed 63.1 / 88.6; GPT-2 medium on E2E (Table 3), BLEU: LoRA 70.4 "
        "(0.35M), FT 68.2 (355M), FT-Top2 68.1, PreLayer 69.7, Adapter^H 67.3, Adapter^L 66.3",
        f"{HOLDS}: LoRA within the margin of FT (or above) with under 1% of its trainable "
        "parameters, and no other method (FT-Top2, BitFit, PreEmbed, PreLayer, Adapter^H, "
        f"Adapter^L) above LoRA by more than the margin; {_ONE_OF_TWO}",
        "methods",
        lora_against_the_methods,
    ),
    Finding(
        "2. LoRA is stable across ranks (r = 1 … 64)",
        "GPT-3 (Table 6), W_q, W_v at r = 1, 2, 4, 8, 64: WikiSQL 73.4, 73.3, 73.7, 73.8, "
        "73.5; MNLI 91.3, 91.4, 91.3, 91.6, 91.4",
        f"{HOLDS}: every rank of W_q, W_v within the margin of the best rank; {PARTLY}: all "
        f"ranks but one; {FAILS}: otherwise",
        "ranks",
        stable_across_ranks,
    ),
    Finding(
        "3. More weight types at a small rank beat one at a large rank",
        "GPT-3, 18M parameters (Table 5), WikiSQL / MNLI: W_q r=8 70.4 / 91.0; W_q, W_v "
        "r=4 73.7 / 91.3; W_q, W_k, W_v, W_o r=2 73.7 / 91.7",
        f"{HOLDS}: W_q, W_v at r=4 and all four at r=2 each above W_q at r=8 by more than "
        f"the margin; {PARTLY}: one of them, or both higher within the margin; {FAILS}: "
        "otherwise",
        "ranks",
        more_weight_types,
    ),
    Finding(
        "4. Low data: LoRA stays close to FT; prefix methods degrade sharply",
        "GPT-3 on MNLI-n (Table 16): with 100 examples FT 60.2, LoRA 63.8, PreEmbed 37.6, "
        "PreLayer 48.3; with 10k FT 88.9, LoRA 89.2, PreEmbed 79.5, PreLayer 85.9",
        f"{HOLDS}: at every size LoRA within the margin of FT (or above), and at the "
        "smallest size both PreEmbed and PreLayer below LoRA by more than the margin, by a "
        f"wider gap than at the largest size; {_ONE_OF_TWO}",
        "low-data",
        low_data,
    ),
    Finding(
        "5. Prefix tuning is non-monotonic in its size; LoRA is not",
        "GPT-3 (Section 5.5, Table 15), WikiSQL: PreEmbed 63.1 at 256 tokens, 55.9 at 512; "
        "PreLayer 70.1 at 16, 64.9 at 64; LoRA (Table 6) 73.4–73.8 from r = 1 to 64",
        f"{HOLDS}: PreEmbed or PreLayer has a larger size scoring below a smaller one by "
        f"more than the margin, and LoRA has no such fall; {_ONE_OF_TWO}",
        "scaling",
        prefix_size,
    ),
    Finding(
        "6. LoRA+PE can add a little on some tasks",
        "GPT-3, WikiSQL / MNLI-m: LoRA 73.4 / 91.7 (Table 4), LoRA+PE (r = 8, l_p = 8, "
        "l_i = 4) 75.0 / 91.4 (Table 15)",
        f"{HOLDS}: LoRA+PE above LoRA by more than the margin on some task; {PARTLY}: "
        f"higher on some task, within the margin; {FAILS}: lower on every task",
        "lora-pe",
        lora_with_prefix,
    ),
    Finding(
        "7. Merged LoRA adds no latency; adapters do",
        "GPT-2 medium (Table 1): at batch 1, sequence 128, Adapter^L +20.7% and Adapter^H "
        "+30.3%; at batch 32, sequence 512, +2.2% and +3.0%; merged LoRA as fine-tuning",
        f"{HOLDS}: merged LoRA within 5% of the base at every shape, and an adapter at "
        f"least 10% slower at the smallest shape and less so at the largest; {PARTLY}: the "
        f"first only; {FAILS}: merged LoRA more than 5% slower somewhere",
        "latency",
        latency,
    ),
    Finding(
        "8. A's top directions at r=8 and r=64 overlap; ΔW amplifies what W does not stress",
        "GPT-3 (Section 7): the top direction of A_{r=8} and A_{r=64} overlaps with φ above "
        "0.5; ΔW_q amplifies its directions in W_q by 21.5 at r = 4 (Table 7: 6.91 / 0.32) "
        "and by about 2 at r = 64",
        f"{HOLDS}: the mean φ(1, 1) over the adapted matrices above 0.5 and three times "
        "that of random matrices, and the amplification factor of W_q above 1 at every "
        f"rank and largest at the smallest rank; {_ONE_OF_TWO}",
        "subspace",
        subspace,
    ),
    Finding(
        "AdaLoRA beats LoRA at the same final budget",
        "DeBERTaV3-base, MNLI-m (AdaLoRA's Table 1): LoRA r = 2 90.30 (0.33M parameters), "
        "AdaLoRA 90.66 (0.32M); LoRA r = 8 90.65 (1.33M), AdaLoRA 90.76 (1.27M)",
        f"{HOLDS}: AdaLoRA above LoRA of the same final rank by more than the margin; "
        f"{PARTLY}: higher within the margin; {FAILS}: lower",
        "adalora",
        adalora_against_lora,
    ),
    Finding(
        "Beyond the paper: DPO after SFT drops and invents fewer slots",
        "not in the paper (issue 33): DPO (Rafailov et al., 2023) on e2e pairs whose "
        "rejected text drops, alters or invents a slot, continuing the SFT adapter",
        f"{HOLDS}: SFT + DPO below SFT in slot errors per 100 MRs and above it in held-out "
        f"preference accuracy, each by more than the margin; {PARTLY}: one of the two; "
        f"{FAILS}: neither",
        "dpo",
        dpo_after_sft,
    ),
    Finding(
        "Beyond the paper: GRPO on a verifiable reward after SFT",
        "not in the paper (issue 33): GRPO (Shao et al., 2024) on sql, rewarded by whether "
        "the generated query returns the gold rows, continuing the SFT adapter",
        f"{HOLDS}: SFT + GRPO above SFT in execution accuracy by more than the margin; "
        f"{PARTLY}: higher within the margin; {FAILS}: not higher",
        "grpo",
        grpo_after_sft,
    ),
)


def _both(first: bool, second: bool) -> str:
    return HOLDS if first and second else PARTLY if first or second else FAILS


# -- the page ---------------------------------------------------------------------------------


def verdicts(directory: str | Path) -> list[Verdict]:
    """Every finding's verdicts from the results in ``directory``."""
    results = Results(Path(directory))
    found = []
    for f in FINDINGS:
        judged = f.judge(results) or [
            (f"no {f.experiment}.json here: run `loralab reproduce {f.experiment}`", UNMEASURED)
        ]
        found += [Verdict(f.name, f.paper, measured, f.rule, v) for measured, v in judged]
    return found


def write_verdicts(directory: str | Path) -> Path:
    """Write ``directory/REPORT.md``: the verdict table, then each finding's numbers,
    rule and figure."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is not a results folder (run loralab reproduce first)"
        )
    found = verdicts(directory)
    results = Results(directory)
    rows = [[v.finding, v.verdict, v.measured] for v in found]
    lines = [
        f"# What held: the paper's findings at this scale ({directory.name})",
        "",
        "Computed by `loralab reproduce report` from the experiments' JSON files in this "
        "folder. A difference counts only when it is larger than its *margin*: the standard "
        "error of the difference of the two means over seeds, and at least one point of the "
        "metric. Each finding's rule is written under it.",
        "",
        markdown_table(["Finding", "Verdict", "Measured"], rows),
        "",
    ]
    for verdict in found:
        lines += [
            f"## {verdict.finding}",
            "",
            f"- Paper: {verdict.paper}",
            f"- Measured: {verdict.measured}",
            f"- Rule: {verdict.rule}",
            f"- Verdict: **{verdict.verdict}**",
            "",
        ]
    figures = [name for name in results.raw if (directory / f"{name}.png").is_file()]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({name}.png)" for name in figures] + [""]
    page = directory / "REPORT.md"
    write_files_atomically(directory, {page.name: text_writer("\n".join(lines))})
    return page
