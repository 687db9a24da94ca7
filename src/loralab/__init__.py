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
    "TrainConfig": "training.config",
    "train": "training.loop",
    "load_model": "models.loading",
    "AdapterInfo": "lora.adapters",
    "active_adapter": "lora.adapters",
    "combine_adapters": "lora.adapters",
    "delete_adapter": "lora.adapters",
    "disabled_adapters": "lora.adapters",
    "hot_swap_adapter": "files.hot_swap",
    "list_adapters": "lora.adapters",
    "load_all_adapters": "files.adapter_sets",
    "save_all_adapters": "files.adapter_sets",
    "set_active_adapter": "lora.adapters",
    "ConfigError": "lora.config",
    "LoraConfig": "lora.config",
    "DoraConv1D": "lora.dora",
    "DoraFactors": "lora.dora",
    "DoraLinear": "lora.dora",
    "ParameterReport": "lora.inject",
    "TargetError": "lora.inject",
    "adapter_configs": "lora.inject",
    "inject_adapter": "lora.inject",
    "lora_layers": "lora.inject",
    "plan_targets": "lora.inject",
    "trainable_parameters": "lora.inject",
    "adapter_state_dict": "files.adapter_dir",
    "import_loralib": "files.loralib",
    "load_adapter": "files.adapter_dir",
    "read_adapter": "files.adapter_dir",
    "save_adapter": "files.adapter_dir",
    "FusedParts": "lora.layers",
    "LoraConv1D": "lora.layers",
    "LoraConv2d": "lora.layers",
    "LoraEmbedding": "lora.layers",
    "LoraFactors": "lora.layers",
    "LoraFusedLinear": "lora.layers",
    "LoraLayer": "lora.layers",
    "LoraLinear": "lora.layers",
    "MergeError": "lora.layers",
    "merge_adapter": "lora.merge",
    "merge_and_unload": "lora.merge",
    "merge_state_dicts": "files.state_dict_merge",
    "unload": "lora.merge",
    "unmerge_adapter": "lora.merge",
    "mixed_adapters": "lora.mixing",
    "AdapterFileError": "files.peft_config",
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
