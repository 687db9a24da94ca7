"""loralab: LoRA (Hu et al., ICLR 2022) for PyTorch and Hugging Face Transformers."""

from .config import ConfigError, LoraConfig
from .inject import (
    ParameterReport,
    TargetError,
    adapter_configs,
    inject_adapter,
    lora_layers,
    plan_targets,
    trainable_parameters,
)
from .io import (
    AdapterFileError,
    adapter_state_dict,
    import_loralib,
    load_adapter,
    read_adapter,
    save_adapter,
)
from .layers import (
    FusedParts,
    LoraConv1D,
    LoraConv2d,
    LoraEmbedding,
    LoraFusedLinear,
    LoraLayer,
    LoraLinear,
    MergeError,
)
from .merge import merge_adapter, merge_and_unload, merge_state_dicts, unload, unmerge_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "ConfigError",
    "FusedParts",
    "LoraConfig",
    "LoraConv1D",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraFusedLinear",
    "LoraLayer",
    "LoraLinear",
    "MergeError",
    "ParameterReport",
    "TargetError",
    "adapter_configs",
    "adapter_state_dict",
    "import_loralib",
    "inject_adapter",
    "load_adapter",
    "lora_layers",
    "merge_adapter",
    "merge_and_unload",
    "merge_state_dicts",
    "plan_targets",
    "read_adapter",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]
