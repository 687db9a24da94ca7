"""Every adapter of a model in one directory, in PEFT's layout: ``default`` at the top,
the others in sub-directories named for them.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..lora.inject import adapter_configs
from .adapter_dir import (
    load_adapter,
    save_adapter,
)
from .peft_config import CONFIG_FILE, AdapterFileError


def save_all_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save every adapter in PEFT's layout: ``default`` at the top, others in sub-directories."""
    directory = Path(directory)
    names = list(adapter_configs(model))
    if not names:
        raise KeyError("the model has no adapter to save")
    for name in names:
        save_adapter(model, directory if name == "default" else directory / name, name)
    return directory


def load_all_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load what ``save_all_adapters`` wrote (or PEFT's ``save_pretrained`` of several)."""
    directory = Path(directory)
    found = []
    if (directory / CONFIG_FILE).exists():
        found.append(("default", directory))
    for child in sorted(p for p in directory.iterdir() if p.is_dir()):
        if (child / CONFIG_FILE).exists():
            found.append((child.name, child))
    if not found:
        raise AdapterFileError(
            f"{directory} holds no adapter ({CONFIG_FILE} at the top or in sub-directories)"
        )
    for name, path in found:
        load_adapter(model, path, adapter_name=name)
    return [name for name, _ in found]
