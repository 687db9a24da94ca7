"""The paper's findings as commands: ``loralab reproduce NAME [--quick]``.

Each experiment is one module with ``NAME``, ``SUMMARY``, a ``QUICK`` and a ``FULL``
``Scale``, ``FULL_HOURS`` (its expected time in the full mode on 2 cores) and
``run(scale, workdir) -> Report``; ``reproduce`` runs one and writes its Markdown table,
JSON file and PNG figure.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from ..config import ConfigError
from ..output_dirs import check_output_dir
from .report import Report, write_report
from .settings import Scale, default_jobs

# name -> module, in the order of SPEC.md's findings
EXPERIMENT_MODULES = {
    "methods": "methods",
    "ranks": "ranks",
    "low-data": "low_data",
    "scaling": "scaling",
    "lora-pe": "lora_pe",
    "adalora": "adalora",
    "latency": "latency",
    "subspace": "subspace",
}
EXPERIMENT_NAMES = tuple(EXPERIMENT_MODULES)


def get_experiment(name: str) -> ModuleType:
    """The experiment module called ``name``; an unknown name lists the valid ones."""
    if name not in EXPERIMENT_MODULES:
        raise ConfigError(
            f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENT_NAMES)}"
        )
    return importlib.import_module(f"{__name__}.{EXPERIMENT_MODULES[name]}")


def reproduce(
    name: str,
    quick: bool = False,
    seeds: int | None = None,
    output_dir: str | Path = "results",
    command: str | None = None,
    jobs: int | None = None,
) -> dict[str, Path]:
    """Run experiment ``name`` and write ``output_dir/NAME.{md,json,png}``; ``jobs`` runs
    train side by side (default: one per core; ``latency`` always times one at a time)."""
    experiment = get_experiment(name)
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    output_dir = check_output_dir(output_dir, "--output-dir")  # before hours of training
    scale: Scale = (experiment.QUICK if quick else experiment.FULL).with_seeds(seeds)
    scale = replace(scale, jobs=jobs or default_jobs())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"loralab-{name}-") as workdir:
        report: Report = experiment.run(scale, Path(workdir))
    report.seconds = time.perf_counter() - started
    return write_report(report, output_dir, command)


__all__ = ["EXPERIMENT_NAMES", "get_experiment", "reproduce"]
