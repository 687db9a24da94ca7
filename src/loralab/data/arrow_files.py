"""Records from the files of Hugging Face's ``datasets`` library: Parquet, Arrow, and
the folders ``Dataset.save_to_disk`` writes (one dataset, or a ``DatasetDict`` of
splits), read through ``datasets`` itself (the ``data`` extra), in memory (nothing is
written to its cache), and never from the Hub.

Also the in-memory objects a library user hands to ``train()``: a ``Dataset``, a
``DatasetDict``, or any sequence of records.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".parquet", ".arrow")
EXTRA = "pip install 'loralab[data]'"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder ``save_to_disk`` wrote."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "state.json")
    )


def read_splits(path: Path) -> dict[str, list[tuple[str, dict]]]:
    """Each split's records, each with where it is (``file, row N``): a Parquet or Arrow
    file is one split, ``train``; a saved ``DatasetDict`` has its own."""
    what = "a saved dataset folder" if path.is_dir() else f"a {path.suffix} file"

    def load(datasets):
        if path.is_dir():
            return datasets.load_from_disk(str(path), keep_in_memory=True)
        if path.suffix.lower() == ".parquet":
            return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        return datasets.Dataset.from_file(str(path), in_memory=True)

    return splits_of(through_datasets(str(path), what, load), str(path))


def through_datasets(label: str, what: str, load: Callable[[Any], Any]) -> Any:
    """``load(datasets)``, the ``datasets`` module imported (the data extra; ``what`` the
    source says which needs it), its progress bars off (a local read's are noise here),
    and anything it raises one line that names ``label``."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{label}: {what} is read through the datasets library, which is not "
            f"installed: {EXTRA} (JSONL and CSV need nothing more)"
        ) from None
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        return load(datasets)
    except Exception as error:  # datasets and pyarrow raise many kinds; one line each
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{label}: the datasets library cannot read it ({type(error).__name__}: {message})"
        ) from None
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()


def splits_of(data: Any, label: str) -> dict[str, list[tuple[str, dict]]]:
    """The splits of an in-memory source (a ``DatasetDict`` or a dict of record lists:
    its own; a ``Dataset`` or a sequence of records: ``train``), each record with where
    it is."""
    if isinstance(data, Mapping):
        if not data:
            raise DataError(f"{label}: the dataset has no splits")
        if not all(_table(value) for value in data.values()):
            raise DataError(
                f"{label}: one record (a dict of fields), not a dataset; give a list of "
                "records, a datasets.Dataset or a DatasetDict"
            )
        return {str(name): _rows(split, f"{label}[{name!r}]") for name, split in data.items()}
    return {"train": _rows(data, label)}


def _rows(data: Any, label: str) -> list[tuple[str, dict]]:
    if not _table(data):
        raise DataError(
            f"{label}: expected a datasets.Dataset, a DatasetDict or a sequence of records "
            f"(dicts), got {type(data).__name__}"
        )
    if not isinstance(data, Sequence):  # a Dataset: its table converted at once, 17x
        data = data.to_list()  # faster than row by row (100,000 rows: 0.09 s, not 1.5 s)
    rows = []
    for index, record in enumerate(data):
        if not isinstance(record, Mapping):
            raise DataError(f"{label}, row {index}: expected a record (a dict), got {record!r}")
        rows.append((f"{label}, row {index}", dict(record)))
    return rows


def _table(value: Any) -> bool:
    """A sequence of records or a ``datasets.Dataset`` (checked without importing it)."""
    if isinstance(value, str | bytes):
        return False
    if isinstance(value, Sequence):
        return True
    module = sys.modules.get("datasets")
    return module is not None and isinstance(value, module.Dataset)
