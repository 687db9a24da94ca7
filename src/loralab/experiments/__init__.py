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
from pathlib import Path
from types import ModuleType

from ..config import ConfigError
from .base import Report, Scale, write_report

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
) -> dict[str, Path]:
    """Run experiment ``name`` and write ``output_dir/NAME.{md,json,png}``."""
    experiment = get_experiment(name)
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    scale: Scale = (experiment.QUICK if quick else experiment.FULL).with_seeds(seeds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"loralab-{name}-") as workdir:
        report: Report = experiment.run(scale, Path(workdir))
    report.seconds = time.perf_counter() - started
    return write_report(report, Path(output_dir), command)


__all__ = ["EXPERIMENT_NAMES", "get_experiment", "reproduce"]
