"""Every run's result, kept as soon as it finishes, under a key of everything that
determines it.

A run is determined by its training settings (every ``TrainConfig`` field it sets: the
model, task, method and its settings, seed, data seed, sizes, learning rate …), by what
it is scored on (the splits and their sizes), by the torch and Transformers versions, and
by ``STORE_VERSION``, raised whenever a change to loralab changes what a run computes.
The key is the SHA-256 of those as canonical JSON; the result is one JSON file named by
it, written atomically once the run has been trained and scored, so a run cut short
leaves nothing that could be taken for a finished one.

``reproduce`` asks the store first and trains only what it lacks: after a kill or a
reboot, or with more seeds, it goes on where it stopped; N processes over one shared
folder (a cluster's job array, ``--shard K/N``) each train their share of one plan.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..files.atomic_write import json_writer, write_files_atomically
from ..lora.config import ConfigError
from ..training.config import TrainConfig

STORE_FOLDER = "runs"  # in a results folder: results/standard/runs/<key>.json
STORE_VERSION = 1
"""Raise when what a run computes changes (a fix in training or scoring): old results then
no longer match any key, and are trained again."""

# Settings that change where a run writes or what it prints, not what it computes.
_NOT_DETERMINING = ("output_dir", "progress")
# TrainConfig fields whose default is None: set to None they are the same run as unset,
# so they hash alike (an arm may name the default, as recipe's does for the head's rate).
_NONE_BY_DEFAULT = frozenset(
    f.name for f in fields(TrainConfig) if f.default is None and f.default_factory is MISSING
)


def run_key(settings: dict[str, Any], scoring: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key of a run and the inputs it hashes."""
    inputs = {
        "store_version": STORE_VERSION,
        "settings": {
            k: v
            for k, v in sorted(settings.items())
            if k not in _NOT_DETERMINING and not (v is None and k in _NONE_BY_DEFAULT)
        },
        "scoring": scoring,
        "environment": _environment(),
    }
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:32], json.loads(text)


@dataclass(frozen=True)
class Shard:
    """``--shard K/N``: this process trains every N-th run of the plan, from the K-th."""

    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must be K/N (for instance 2/8), got {text!r}") from None
        if not 1 <= index <= count:
            raise ConfigError(f"--shard K/N needs 1 ≤ K ≤ N, got {text!r}")
        return cls(index, count)

    def owns(self, position: int) -> bool:
        """Whether this shard trains the run at ``position`` (0-based) of a plan."""
        return position % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class RunStore:
    """The stored results of one folder: ``<directory>/<key>.json``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of ``key`` (None when the run has not finished)."""
        path = self.directory / f"{key}.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)["result"]
        except (ValueError, KeyError) as error:  # written atomically: only a hand edit
            raise ConfigError(f"{path}: not a stored run result ({error})") from None

    def put(self, key: str, inputs: dict[str, Any], result: Any) -> Path:
        """Keep ``result`` (a dataclass) under ``key``, with the inputs it came from."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "inputs": inputs, "result": asdict(result)}
        write_files_atomically(self.directory, {f"{key}.json": json_writer(record)})
        return self.directory / f"{key}.json"

    def count(self) -> int:
        """How many finished runs the folder holds."""
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0


def _environment() -> dict[str, str]:
    """The libraries whose kernels decide a run's last bits: a run is repeated bit for bit
    on one CPU at any ``--jobs`` (tests/experiments/test_experiment_store.py), not across
    versions."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a run setting of type {type(value).__name__} cannot be keyed: {value!r}")
