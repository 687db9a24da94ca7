"""The error bad data raises (a file, a record or a dataset the user gave)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""
