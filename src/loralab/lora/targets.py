"""What a config resolves to on a model: the modules (and expert weights) to wrap."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError
from .layers import FusedParts, LoraLayer


class TargetError(ConfigError):
    """The config does not fit the model: a target matches nothing, a rank is too big…"""


@dataclass
class Target:
    """One module to adapt, resolved from a config: everything needed to wrap it."""

    name: str
    layer: LoraLayer  # the existing wrapper, or a new one not yet placed in the model
    r: int
    alpha: float
    short_names: tuple[str, ...] = ()
    parts: FusedParts | None = None


def name_matches(entry: str, name: str) -> bool:
    """PEFT's rule for a list entry: the exact name, or a ``.entry`` suffix."""
    return name == entry or name.endswith("." + entry)
