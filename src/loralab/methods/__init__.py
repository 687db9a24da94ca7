"""The ways to adapt a frozen model that the paper compares (SPEC.md, "The baselines").

Every method follows ``Method`` (``method.py``); ``get_method`` finds one by its command-line
name, and ``files.py`` saves and loads what any of them trained.
"""

from __future__ import annotations

from ..lora.config import ConfigError
from .adalora.method import AdaLora
from .adapter_layers import AdapterH, AdapterL
from .bitfit import BitFit
from .full import FullFineTuning, TopLayersFineTuning
from .lora import Lora
from .method import Method, MethodRecord, MethodSettings, applied_method
from .prefix import LoraPrefixEmbedding, PreEmbed, PreLayer

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        FullFineTuning(),
        TopLayersFineTuning(),
        Lora(),
        PreEmbed(),
        PreLayer(),
        LoraPrefixEmbedding(),
        BitFit(),
        AdapterH(),
        AdapterL(),
        AdaLora(),
    )
}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; choose one of: {', '.join(METHOD_NAMES)}"
        ) from None


__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "Method",
    "MethodRecord",
    "MethodSettings",
    "applied_method",
    "get_method",
]
