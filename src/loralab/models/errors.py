"""The one error of this package: a model could not be found, fetched or loaded."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched or loaded; the message says what to do."""
