"""An experiment's outputs: statistics over seeds, Markdown tables, and the three files
(a Markdown table, a JSON file of every raw number, a PNG figure), written all or none.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..files.atomic_write import json_writer, write_files_atomically
from .runs import RunResult
from .settings import Scale, default_jobs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def metric_of(results: Sequence[RunResult], label: str, task: str, metric: str) -> list[float]:
    return [r.metrics[metric] for r in results if r.label == label and r.task == task]


def format_mean_std(values: Sequence[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {default_jobs()} cores, torch "
        f"{torch.__version__}, Python {platform.python_version()}"
    )


@dataclass
class Report:
    """An experiment's outputs before they are written."""

    name: str
    title: str
    body: str  # Markdown: the tables and what they show
    raw: dict[str, Any]  # every number, for the JSON file
    draw: Callable[[Any], None]  # draws the figure on a matplotlib Figure
    scale: Scale
    seconds: float = 0.0

    def markdown(self, command: str) -> str:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"# {self.title}\n\n"
            f"- Command: `{command}`\n"
            f"- Date: {date}; the run took {self.seconds / 60:.1f} min{self._runs_time()}\n"
            f"- Machine: {machine_line()}\n"
            f"- Scale: {self.scale.describe()}\n\n"
            f"{self.body}\n"
        )

    def _runs_time(self) -> str:
        """What the runs themselves took, reused ones included: a mode's cost even when it
        ran in pieces (one thread each: divide by the jobs for the time on the clock)."""
        # RunResult records (the subspace analysis keeps its own kind of "runs")
        runs = [r for r in self.raw.get("runs", []) if "train_seconds" in r and "eval_seconds" in r]
        if not runs:
            return ""
        seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)
        tried = [
            c
            for s in self.raw.get("selection", [])
            for c in s["candidates"]
            if c["learning_rate"] != s["chosen"]  # the chosen one is among the runs
        ]
        seconds += sum(c["seconds"] for c in tried)
        return (
            f" ({len(runs) + len(tried)} runs: {seconds / 60:.1f} min of training and "
            "scoring, one thread each)"
        )


def write_report(report: Report, directory: Path, command: str | None = None) -> dict[str, Path]:
    """Write ``NAME.md``, ``NAME.json`` and ``NAME.png`` to ``directory``, all or none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    command = command or " ".join(["loralab", *sys.argv[1:]])
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / f"{report.name}.{kind}" for kind in ("md", "json", "png")}
    figure = plt.figure(figsize=(7, 4.5))
    try:
        report.draw(figure)
        figure.tight_layout()

        def save_png(path: str) -> None:
            figure.savefig(path, dpi=120, format="png")

        raw = {"experiment": report.name, "scale": asdict(report.scale), **report.raw}
        write_files_atomically(
            directory,
            {
                paths["md"].name: lambda p: Path(p).write_text(report.markdown(command)),
                paths["json"].name: json_writer(raw),
                paths["png"].name: save_png,
            },
        )
    finally:
        plt.close(figure)
    return paths


def runs_as_dicts(results: Sequence[RunResult]) -> list[dict]:
    return [asdict(r) for r in results]


def raw_of(results: Sequence[RunResult]) -> dict[str, Any]:
    """The JSON file's runs, and how each arm's learning rate was chosen (if it was)."""
    raw: dict[str, Any] = {"runs": runs_as_dicts(results)}
    selections = getattr(results, "selections", [])
    if selections:
        raw["selection"] = [asdict(s) for s in selections]
    return raw


def selection_section(results: Sequence[RunResult]) -> str:
    """A table of the learning-rate selection: every candidate's validation score, the
    choice in bold (empty when the rates were not selected)."""
    selections = getattr(results, "selections", [])
    if not selections:
        return ""
    width = max(len(s.candidates) for s in selections)
    rows = []
    for s in selections:
        cells = [
            f"**{c['learning_rate']:.2g}: {c['validation']:.1f}**"
            if c["learning_rate"] == s.chosen
            else f"{c['learning_rate']:.2g}: {c['validation']:.1f}"
            for c in s.candidates
        ]
        rows.append([s.label, s.task, s.metric, *cells, *[""] * (width - len(cells))])
    header = ["Arm", "task", "validation", *[f"rate {i + 1}" for i in range(width)]]
    return (
        "\n\nLearning rates, chosen on validation with the first seed (rate: score; the "
        "choice in bold), then trained with every seed:\n\n" + markdown_table(header, rows)
    )
