"""The paper's findings as commands: ``loralab reproduce NAME [--quick]``.

Each experiment is one module with ``NAME``, ``SUMMARY``, a ``QUICK`` and a ``FULL``
``Scale`` (and a ``STANDARD`` one where it has that mode), ``FULL_HOURS`` (its expected
time in the full mode on 2 cores) and ``run(scale, workdir) -> Report``; ``reproduce``
runs one and writes its Markdown table, JSON file and PNG figure.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from ..files.output_dirs import check_output_dir
from ..lora.config import ConfigError
from ..models.devices import check_quantized_base
from .settings import Scale, default_jobs
from .store import STORE_FOLDER, Shard

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
    "recipe": "recipe",  # not a finding: whether LoRA's plateau on nli is the recipe's
    "dpo": "preference",  # beyond the paper: DPO after SFT (issue 33)
    "grpo": "grpo",  # beyond the paper: GRPO on a verifiable reward after SFT (issue 33)
}
EXPERIMENT_NAMES = tuple(EXPERIMENT_MODULES)


def get_experiment(name: str) -> ModuleType:
    """The experiment module called ``name``; an unknown name lists the valid ones."""
    if name not in EXPERIMENT_MODULES:
        raise ConfigError(
            f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENT_NAMES)}"
        )
    return importlib.import_module(f"{__name__}.{EXPERIMENT_MODULES[name]}")


MODES = ("quick", "standard", "full")


def reproduce(
    name: str,
    mode: str = "full",
    seeds: int | None = None,
    output_dir: str | Path | None = None,
    command: str | None = None,
    jobs: int | None = None,
    shard: Shard | None = None,
    quantized_base: str | None = None,
) -> dict[str, Path]:
    """Run experiment ``name`` at ``mode`` and write ``output_dir/NAME.{md,json,png}``
    (default ``results/MODE``); ``jobs`` runs train side by side (default: one per core;
    ``latency`` always times one at a time).

    Every run's result is kept in ``output_dir/runs`` as it finishes and read from there
    when it exists, so a run again after a kill, or with more seeds, trains only what is
    missing. With ``shard`` only that share of the missing runs is trained, and when other
    shards' runs are still missing the report is not written: the result is ``{}``.
    ``quantized_base`` trains every run over its base stored so (``--quantized-base``)."""
    # torch loads here, not with the package: the command line reads the names above
    from .report import Report, write_report
    from .runs import RunsMissing

    experiment = get_experiment(name)
    if mode not in MODES:
        raise ConfigError(f"the mode must be one of {', '.join(MODES)}, got {mode!r}")
    scale: Scale | None = getattr(experiment, mode.upper(), None)
    if scale is None:
        have = [m for m in MODES if getattr(experiment, m.upper(), None) is not None]
        raise ConfigError(f"{name} has no {mode} mode; it has {', '.join(have)}")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    check_quantized_base(quantized_base, "--quantized-base")
    output_dir = Path("results") / mode if output_dir is None else Path(output_dir)
    output_dir = check_output_dir(output_dir, "--output-dir")  # before hours of training
    scale = replace(
        scale.with_seeds(seeds),
        jobs=jobs or default_jobs(),
        quick=mode == "quick",
        name=mode,
        store=str(output_dir / STORE_FOLDER),
        shard=shard,
        quantized_base=quantized_base,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"loralab-{name}-") as workdir:
        try:
            report: Report = experiment.run(scale, Path(workdir))
        except RunsMissing as missing:
            print(missing)
            return {}
    report.seconds = time.perf_counter() - started
    return write_report(report, output_dir, command)


__all__ = ["EXPERIMENT_NAMES", "MODES", "Shard", "get_experiment", "reproduce"]
