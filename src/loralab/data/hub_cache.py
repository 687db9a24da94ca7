"""A Hub dataset already on this machine: ``--data owner/name`` read from the local
Hugging Face Hub cache (where ``datasets.load_dataset`` or ``huggingface-cli download``
left it), through the ``datasets`` library (the ``data`` extra), which finds its splits
by its files' names. Nothing is fetched: an id that is not in the cache says so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(text: str) -> bool:
    """``name`` or ``owner/name``, with no file suffix (a path is tried as a path first)."""
    return HUB_ID.match(text) is not None and Path(text).suffix == ""


def hub_cache() -> Path:
    """The Hub cache folder, as ``huggingface_hub`` resolves it: ``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_snapshot(name: str) -> Path | None:
    """The folder of the newest snapshot of dataset ``name`` in the Hub cache (its
    ``main`` revision where the cache records one), or None."""
    folder = hub_cache() / f"datasets--{name.replace('/', '--')}"
    main = folder / "refs" / "main"
    if main.is_file():
        snapshot = folder / "snapshots" / main.read_text(encoding="utf-8").strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((folder / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def read_cached(name: str, snapshot: Path) -> dict[str, list[tuple[str, dict]]]:
    """Each split's records of the cached dataset, each with where it is."""
    from .arrow_files import splits_of, through_datasets

    loaded = through_datasets(
        f"{name} (the Hub cache's {snapshot})",
        "a Hub dataset",
        lambda datasets: datasets.load_dataset(str(snapshot), keep_in_memory=True),
    )
    return splits_of(loaded, name)
