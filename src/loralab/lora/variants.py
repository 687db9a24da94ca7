"""One registry for the variants of the layer: which layer class a config asks for on a
base module, and where it cannot go.

A variant is chosen by a config (DoRA by ``use_dora``), names its factors class (whose
capabilities, such as ``is_product`` and ``reads_weight``, every consumer asks instead of
the config's flags), and maps a base module to its layer class (None: not supported).
LoRA itself is the last entry: it takes every config. A new variant is one new file that
defines its ``Variant`` plus one line in ``VARIANTS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .dora import DoraFactors, dora_class_for
from .layers import LoraFactors, LoraLayer, lora_class_for

if TYPE_CHECKING:
    from .config import LoraConfig


@dataclass(frozen=True)
class Variant:
    name: str
    chosen_by: Callable[[LoraConfig], bool]
    factors_class: type[LoraFactors]
    layer_class_for: Callable[[nn.Module], type[LoraLayer] | None]
    supported: str
    """The module types it adapts, for the error where a target is none of them."""
    takes_fused_parts: bool
    """Whether it can adapt some parts of a fused projection (GPT-2's c_attn q and v)."""


DORA = Variant("DoRA", lambda c: c.use_dora, DoraFactors, dora_class_for, "Linear, Conv1D", False)
LORA = Variant(
    "LoRA",
    lambda c: True,
    LoraFactors,
    lora_class_for,
    "Linear, Conv1D, Embedding, Conv2d",
    True,
)

# The first variant whose ``chosen_by`` takes the config: one line per variant.
VARIANTS = (
    DORA,
    LORA,
)


def variant_for(config: LoraConfig) -> Variant:
    """The variant ``config`` asks for."""
    return next(v for v in VARIANTS if v.chosen_by(config))
