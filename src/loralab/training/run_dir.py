"""What a training run leaves in its ``--output-dir``, and whether an earlier run is there.

``loralab train`` into a folder that holds another run would replace its adapter, its
metrics and its plot, and leave its checkpoint beside the new files; so the command
refuses, unless told to continue it (``--resume``) or to replace it (``--overwrite``,
which removes the earlier run's own files first and nothing else).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..methods.adalora.report import RANKS_HEATMAP, RANKS_JSON
from .checkpoint import CHECKPOINT
from .run_log import METRICS_FILE

ADAPTER = "adapter"
CONFIG = "config.yaml"
LOSS_PLOT = "loss.png"
# Everything a run writes at the top of its folder (the checkpoint's spare included).
RUN_ENTRIES = (
    ADAPTER,
    CHECKPOINT,
    ".checkpoint-previous",
    CONFIG,
    METRICS_FILE,
    LOSS_PLOT,
    "tensorboard",
    RANKS_JSON,
    RANKS_HEATMAP,
)


def previous_run(path: str | Path) -> str | None:
    """What earlier run ``path`` holds, in words, or None."""
    path = Path(path)
    if (path / CHECKPOINT).is_dir():
        return "an interrupted run (its checkpoint is there)"
    if (path / ADAPTER).is_dir():
        return "a finished run (its adapter is there)"
    found = [name for name in RUN_ENTRIES if (path / name).exists()]
    return f"part of a run ({', '.join(found)})" if found else None


def clear_previous_run(path: str | Path) -> None:
    """Remove what an earlier run wrote in ``path``; files of the user's stay."""
    for name in RUN_ENTRIES:
        entry = Path(path) / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
