"""loralab: LoRA (Hu et al., ICLR 2022) for PyTorch and Hugging Face Transformers."""

from .adapters import (
    AdapterInfo,
    active_adapter,
    combine_adapters,
    delete_adapter,
    disabled_adapters,
    hot_swap_adapter,
    list_adapters,
    load_all_adapters,
    save_all_adapters,
    set_active_adapter,
)
from .config import ConfigError, LoraConfig
from .dora import DoraConv1D, DoraFactors, DoraLinear
from .inject import (
    ParameterReport,
    TargetError,
    adapter_configs,
    inject_adapter,
    lora_layers,
    plan_targets,
    trainable_parameters,
)
from .io import adapter_state_dict, import_loralib, load_adapter, read_adapter, save_adapter
from .layers import (
    FusedParts,
    LoraConv1D,
    LoraConv2d,
    LoraEmbedding,
    LoraFactors,
    LoraFusedLinear,
    LoraLayer,
    LoraLinear,
    MergeError,
)
from .merge import merge_adapter, merge_and_unload, merge_state_dicts, unload, unmerge_adapter
from .mixing import mixed_adapters
from .peft_config import AdapterFileError

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterInfo",
    "ConfigError",
    "DoraConv1D",
    "DoraFactors",
    "DoraLinear",
    "FusedParts",
    "LoraConfig",
    "LoraConv1D",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraFactors",
    "LoraFusedLinear",
    "LoraLayer",
    "LoraLinear",
    "MergeError",
    "ParameterReport",
    "TargetError",
    "active_adapter",
    "adapter_configs",
    "adapter_state_dict",
    "combine_adapters",
    "delete_adapter",
    "disabled_adapters",
    "hot_swap_adapter",
    "import_loralib",
    "inject_adapter",
    "list_adapters",
    "load_adapter",
    "load_all_adapters",
    "lora_layers",
    "merge_adapter",
    "merge_and_unload",
    "merge_state_dicts",
    "mixed_adapters",
    "plan_targets",
    "read_adapter",
    "save_adapter",
    "save_all_adapters",
    "set_active_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]
