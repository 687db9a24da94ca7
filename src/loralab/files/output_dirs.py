"""Directories a command writes into, checked before any slow work.

A command that trains for minutes, or loads a model, and only then finds that its output
path is a file has wasted the user's time; ``check_output_dir`` refuses such a path at
once, and creates nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputDirError(ValueError):
    """An output directory cannot be written; the message names the path and why."""


def check_output_dir(path: str | os.PathLike, flag: str, empty: bool = False) -> Path:
    """``path`` as a directory this process can create or write into, or an error.

    ``flag`` names the setting in the message (``--output-dir``). With ``empty=True`` an
    existing directory must be empty (its files would be replaced or mixed with ours).
    Nothing is created.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputDirError(f"{flag} {path} is an existing file, not a directory")
        if empty and any(path.iterdir()):
            raise OutputDirError(
                f"{flag} {path} is a directory that is not empty; name a new directory "
                "(nothing in it was touched)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"{flag} {path}: the directory is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputDirError(f"{flag} {path}: {parent} is a file, so no directory can go there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {path}: {parent} is not writable")
    return path
