"""Hot-swapping an adapter's weights in place from a file, or from files already read
(a server's): the same modules and ranks, or nothing changes and the error says which
differs.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..lora.config import ConfigError
from ..lora.inject import adapter_configs, lora_layers, plan_targets, require_adapter
from .adapter_dir import (
    AdapterFiles,
    factors_from_file,
    read_adapter,
)
from .peft_config import AdapterFileError


def hot_swap_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str,
    safetensors_only: bool = False,
) -> None:
    """Replace the weights of a loaded adapter with another file's, in place.

    No module is created or replaced, so a ``torch.compile``d model keeps working. The new
    file must adapt the same modules with the same ranks; otherwise nothing changes and the
    error says which module or shape differs. A merged adapter stays merged, with the
    new weights. ``safetensors_only`` refuses pickled weights (a server's choice).
    """
    require_adapter(model, adapter_name, "hot-swapped")
    files = read_adapter(directory, safetensors_only=safetensors_only)
    hot_swap_files(model, files, adapter_name, source=str(directory))


def hot_swap_files(
    model: nn.Module, files: AdapterFiles, adapter_name: str, source: str | None = None
) -> None:
    """``hot_swap_adapter`` from files already read and checked (a server reads each
    file once, from what it checked, and swaps from memory); ``source`` names them in
    errors. Everything is checked before any weight changes."""
    require_adapter(model, adapter_name, "hot-swapped")
    directory = source if source is not None else str(files.directory)
    holding = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    incoming = _checked_swap(model, holding, files, adapter_name, directory)
    merged = [layer for layer in holding.values() if adapter_name in layer.merged_adapters]
    for layer in merged:
        layer.unmerge(adapter_name)
    with torch.no_grad():
        for name, (tensors, alpha, scale) in incoming.items():
            factors = holding[name].lora[adapter_name]
            held = factors.tensors()
            for attr, tensor in tensors.items():
                held[attr].copy_(tensor)
            factors.alpha, factors.scale = alpha, scale
    for layer in merged:
        layer.merge(adapter_name)
    adapter_configs(model)[adapter_name] = files.config


def _checked_swap(
    model: nn.Module,
    holding: dict[str, nn.Module],
    files: AdapterFiles,
    adapter_name: str,
    directory: str,
) -> dict[str, tuple[dict[str, Tensor], float, float]]:
    """Each module ``holding`` the adapter: its new tensors, α and scale, or the error
    that says what differs."""
    refused = f"{directory}: cannot hot-swap into {adapter_name!r}"
    rewritten = [n for n, layer in holding.items() if adapter_name in layer.rewrote]
    if rewritten:
        raise AdapterFileError(
            f"{refused}: its init rewrote the base weight of {rewritten[0]!r}, which the new "
            "weights would not expect; delete it and load the new adapter"
        )
    try:  # another kind of adapter (DoRA for LoRA) does not fit the loaded layers
        planned = plan_targets(model, files.config, "__hot_swap__", strict=False)
    except ConfigError as error:
        raise AdapterFileError(f"{refused}: {error}") from None
    targets = {t.name: t for t in planned}
    if set(targets) != set(holding):
        only_new = sorted(set(targets) - set(holding))[:3]
        only_old = sorted(set(holding) - set(targets))[:3]
        raise AdapterFileError(
            f"{refused}: it adapts other modules (only in the file: {only_new}; only in the "
            f"model: {only_old})"
        )
    return {
        name: _checked_tensors(name, targets[name], layer.lora[adapter_name], files, directory)
        for name, layer in holding.items()
    }


def _checked_tensors(name: str, target, factors, files: AdapterFiles, directory: str):
    """One module's tensors from the file, with their α and scale, if they fit in place."""
    if target.r != factors.r:
        raise AdapterFileError(
            f"{directory}: cannot hot-swap {name!r}: rank {target.r} in the file, "
            f"{factors.r} loaded; shapes must match to swap in place"
        )
    try:
        tensors = factors_from_file(target, files.tensors)
    except KeyError as missing:
        raise AdapterFileError(f"{directory}: tensor {missing} is missing") from None
    held = factors.tensors()
    for attr, tensor in tensors.items():
        if tensor.shape != held[attr].shape:
            raise AdapterFileError(
                f"{directory}: cannot hot-swap {name!r}: {attr} has shape "
                f"{tuple(tensor.shape)} in the file, {tuple(held[attr].shape)} loaded"
            )
    return tensors, target.alpha, files.config.scale(target.r, target.alpha)
