"""loralab: LoRA (Hu et al., ICLR 2022) for PyTorch and Hugging Face Transformers.

The public names below are imported on first use (PEP 562), not with the package:
``import loralab.cli`` must not pay for torch and Transformers before ``--help`` is
printed (about 3 s of imports), and ``from loralab import LoraConfig`` still works.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module (under loralab) that defines it
_EXPORTS = {
    "AdapterInfo": "adapters",
    "active_adapter": "adapters",
    "combine_adapters": "adapters",
    "delete_adapter": "adapters",
    "disabled_adapters": "adapters",
    "hot_swap_adapter": "adapters",
    "list_adapters": "adapters",
    "load_all_adapters": "adapters",
    "save_all_adapters": "adapters",
    "set_active_adapter": "adapters",
    "ConfigError": "config",
    "LoraConfig": "config",
    "DoraConv1D": "dora",
    "DoraFactors": "dora",
    "DoraLinear": "dora",
    "ParameterReport": "inject",
    "TargetError": "inject",
    "adapter_configs": "inject",
    "inject_adapter": "inject",
    "lora_layers": "inject",
    "plan_targets": "inject",
    "trainable_parameters": "inject",
    "adapter_state_dict": "io",
    "import_loralib": "io",
    "load_adapter": "io",
    "read_adapter": "io",
    "save_adapter": "io",
    "FusedParts": "layers",
    "LoraConv1D": "layers",
    "LoraConv2d": "layers",
    "LoraEmbedding": "layers",
    "LoraFactors": "layers",
    "LoraFusedLinear": "layers",
    "LoraLayer": "layers",
    "LoraLinear": "layers",
    "MergeError": "layers",
    "merge_adapter": "merge",
    "merge_and_unload": "merge",
    "merge_state_dicts": "merge",
    "unload": "merge",
    "unmerge_adapter": "merge",
    "mixed_adapters": "mixing",
    "AdapterFileError": "peft_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loralab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
