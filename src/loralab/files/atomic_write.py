"""Files and directories that are never half-written.

Everything is written under a temporary name beside its target and renamed into place
(a rename within one file system is atomic), so a failure midway, a full disk or a kill,
leaves the previous contents, never a mix of old and new or a truncated file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files_atomically(directory: Path, writers: dict[str, Any]) -> None:
    """Write every file to a temporary name first, then rename them all into place.

    A failure while writing (a full disk, an error in the writer) leaves the previous
    files untouched: never new weights beside an old config, or the reverse.
    """
    staged: dict[Path, str] = {}
    try:
        for name, write in writers.items():
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            staged[directory / name] = temporary
            write(temporary)
            # mkstemp makes the file private (0600); give it the mode a plain write would.
            os.chmod(temporary, 0o666 & ~_umask())
        for path, temporary in staged.items():
            os.replace(temporary, path)
    except BaseException:
        for temporary in staged.values():
            Path(temporary).unlink(missing_ok=True)
        raise


def json_writer(data: dict) -> Callable[[str], Any]:
    """A writer for ``write_files_atomically``: ``data`` as indented, sorted JSON."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return lambda path: Path(path).write_text(text, encoding="utf-8")


def text_writer(text: str) -> Callable[[str], Any]:
    """A writer for ``write_files_atomically``: ``text`` as UTF-8."""
    return lambda path: Path(path).write_text(text, encoding="utf-8")


def link_writer(source: Path) -> Callable[[str], Any]:
    """A writer for ``write_files_atomically``: ``source`` itself, hard-linked (no second
    copy on disk), or copied where a link cannot be made (another file system)."""

    def write(path: str) -> None:
        os.unlink(path)
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)

    return write


def write_directory_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(scratch)`` on a new directory beside ``target``, then rename it to
    ``target``, which must not exist or be empty. On any failure nothing is left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(scratch)
        # mkdtemp makes the directory private (0700), and writers that stage their own
        # files (Transformers' save_pretrained wrote model.safetensors 0600) may too: give
        # everything the mode a plain mkdir or write would.
        mask = _umask()
        for path in [scratch, *scratch.rglob("*")]:
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target
