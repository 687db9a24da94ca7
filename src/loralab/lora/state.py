"""The one record loralab keeps on a user's model.

What loralab must remember about a model between calls lives in one ``ModelState`` in
the model's ``__dict__``:
- its adapters' configs and which adapter runs;
- what was trainable before the first adapter froze the base;
- which method was applied, and that method's own state (AdaLoRA's importance scores);
- how the frozen base is stored, when it is quantized.

It sits in ``__dict__``, not as a submodule, a parameter or a buffer, so the model's
``state_dict()``, ``named_modules()`` and ``parameters()`` stay exactly the user's. Only this
module reads or writes that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

STATE_KEY = "_loralab"


@dataclass
class ModelState:
    """Everything loralab keeps about one model."""

    adapters: dict[str, Any] = field(default_factory=dict)
    """Adapter name -> its config (a ``LoraConfig``), in the order they were added."""
    active: str | None = None
    """The adapter the model runs (None: the bare base); see ``active_chosen``."""
    active_chosen: bool = False
    """Whether ``active`` was set: before, the first adapter added becomes active."""
    requires_grad: dict[str, bool] | None = None
    """Each parameter's ``requires_grad`` before the first adapter froze the base."""
    method: Any = None
    """The ``MethodRecord`` of the method applied to the model, if any."""
    method_state: Any = None
    """What that method keeps while it trains (AdaLoRA: its ``RankAllocator``)."""
    hooked_head: Any = None
    """The output head that has the hook keeping its input contiguous (``inject.py``)."""
    base_quantization: dict[str, Any] | None = None
    """How the frozen base is stored when it is not dense, as the loader recorded it
    (``models/packed_gguf.py``: the GGUF file and its packed types; ``models/bnb_base.py``:
    bitsandbytes' config), with a one-line ``summary``; a saved adapter's model card says
    it."""


def model_state(model: nn.Module) -> ModelState:
    """The record of ``model``, created empty the first time."""
    state = model.__dict__.get(STATE_KEY)
    if state is None:
        state = model.__dict__[STATE_KEY] = ModelState()
    return state


def has_state(model: nn.Module) -> bool:
    """Whether loralab has touched ``model`` at all."""
    return STATE_KEY in model.__dict__
