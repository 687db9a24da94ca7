"""How a new adapter's factors start, one file per init, registered here by name.

An init sets a new adapter's ``A`` and ``B`` from the layer's geometry (and, for some,
from the frozen weight). One that ``rewrites_base`` (PiSSA, OLoRA) starts with ΔW ≠ 0
and leaves the layer to take exactly that ΔW out of the base, so that the model still
computes what it did; the layer remembers it, to give the original weight back and to
save an adapter that runs on the original base (``files/adapter_dir.py``).
"""

import importlib

from .registry import INITS, Init, get_init, init_of_peft, register_init

# Each init's file registers it when imported: one line per init.
INIT_MODULES = (
    "random",
    "pissa",
    "olora",
)
for _module in INIT_MODULES:
    importlib.import_module(f".{_module}", __name__)

__all__ = ["INITS", "Init", "get_init", "init_of_peft", "register_init"]
