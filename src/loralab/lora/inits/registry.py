"""The registry of inits: the ``Init`` protocol, and each init class by name."""

from __future__ import annotations

import re

from torch import nn


class Init:
    """One way to start the factors; subclasses are registered with ``register_init``."""

    name: str = ""
    """The ``LoraConfig.init`` value; for a family with a parameter, how its names look
    (``pissa_niter_N``), and an instance's own name is the one it was made with."""
    pattern: str | None = None
    """A regex for a family of names (``pissa_niter_4``); None: ``name`` alone."""
    rewrites_base: bool = False
    """Whether the factors start at ΔW ≠ 0, which the layer then takes out of W0."""

    def __init__(self, name: str) -> None:
        self.name = name

    def peft_value(self) -> bool | str:
        """``init_lora_weights`` in PEFT's ``adapter_config.json`` for this init."""
        return self.name

    def refusal(self, layer: nn.Module) -> str | None:
        """Why this init cannot start an adapter on ``layer`` (None: it can)."""
        return None

    def start(self, layer: nn.Module, factors: nn.Module) -> None:
        """Set ``factors``' tensors in place (under ``torch.no_grad``)."""
        raise NotImplementedError


INITS: dict[str, type[Init]] = {}
"""Each registered init class by its name (or its family's pattern)."""


def register_init(init_class: type[Init]) -> type[Init]:
    INITS[init_class.pattern or init_class.name] = init_class
    return init_class


def get_init(name: str) -> Init:
    """The init ``name`` asks for; an unknown name lists the known ones."""
    for key, init_class in INITS.items():
        if (init_class.pattern and re.fullmatch(init_class.pattern, str(name))) or key == name:
            return init_class(name)
    known = ", ".join(repr(c.name) for c in INITS.values())
    raise ValueError(f"init must be one of {known}, got {name!r}")


def init_of_peft(value: bool | str) -> str:
    """loralab's init name for PEFT's ``init_lora_weights`` value."""
    for init_class in INITS.values():
        name = str(value) if init_class.pattern else init_class.name
        if init_class.pattern and not re.fullmatch(init_class.pattern, name):
            continue
        if init_class(name).peft_value() == value:
            return name
    raise ValueError(f"init_lora_weights={value!r} is an init loralab does not know")
