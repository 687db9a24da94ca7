"""Merging: ``W = W0 + (α/r) B A`` for zero added latency, and back.

Merging is explicit and idempotent, never a side effect of ``.eval()``. It also exists as
a pure function over state dicts (``merge_state_dicts``), so an export needs no model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import pattern_value
from .inject import adapter_configs, lora_layers, replace_module, restore_requires_grad
from .layers import (
    LoraLayer,
    MergeError,
    TrainableCopy,
    conv2d_delta,
    low_rank_product,
)
from .peft_config import PEFT_PREFIX
from .state import model_state


def _tied_elsewhere(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every module path that holds it (only those held more than once)."""
    holders: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(name)
    return {key: names for key, names in holders.items() if len(names) > 1}


def merge_adapter(model: nn.Module, adapter_name: str | None = None, safe: bool = False) -> None:
    """Add each layer's ``ΔW`` into its base weight (the active adapter by default).

    With ``safe=True`` every ``ΔW`` is checked for NaN/Inf first and nothing is merged
    if one is bad. A weight tied to another module (GPT-2's ``wte`` and ``lm_head``) is
    refused: merging would change both, while the unmerged update only touched one.
    """
    if adapter_name is not None and adapter_name not in adapter_configs(model):
        raise KeyError(
            f"no adapter named {adapter_name!r}; the model has {sorted(adapter_configs(model))}"
        )
    layers = lora_layers(model)
    tied = _tied_elsewhere(model)
    for name, layer in layers.items():
        holders = [h for h in tied.get(id(layer.base_layer.weight), []) if not h.startswith(name)]
        if holders:
            raise MergeError(
                f"cannot merge into {name!r}: its weight is tied to {holders}, so merging "
                "would change the other module too; untie the weights first"
            )
    if safe:
        # A first pass over every ΔW, so that a bad one leaves all weights untouched; the
        # deltas are recomputed when merging rather than held, which would double memory.
        for name, layer in layers.items():
            adapter = adapter_name or layer.active_adapter
            if adapter in layer.merged_adapters or adapter not in layer.lora:
                continue
            if not torch.isfinite(layer.delta_weight(adapter)).all():
                raise MergeError(
                    f"adapter {adapter!r} has a non-finite ΔW (NaN or Inf) in {name!r}; "
                    "nothing was merged"
                )
    for layer in layers.values():
        adapter = adapter_name or layer.active_adapter
        if adapter in layer.lora:
            layer.merge(adapter)


def unmerge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Subtract merged updates again (all merged adapters when no name is given)."""
    for layer in lora_layers(model).values():
        for adapter in list(reversed(layer.merged_adapters)):
            if adapter_name is None or adapter == adapter_name:
                layer.unmerge(adapter)


def merge_and_unload(
    model: nn.Module, adapter_name: str | None = None, safe: bool = False
) -> nn.Module:
    """Merge, then put the original modules back: a plain model with its original keys."""
    merge_adapter(model, adapter_name, safe=safe)
    return _remove_wrappers(model, keep_trained_copies=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model exactly as it was."""
    unmerge_adapter(model)
    return _remove_wrappers(model, keep_trained_copies=False)


def _remove_wrappers(model: nn.Module, keep_trained_copies: bool) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableCopy):
            replacement = module.active_module() if keep_trained_copies else module.original
            replace_module(model, name, replacement)
        elif isinstance(module, LoraLayer):
            replace_module(model, name, module.base_layer)
    restore_requires_grad(model)
    state = model_state(model)
    state.adapters.clear()
    state.active, state.active_chosen = None, False  # a new adapter becomes active again
    return model


# -- the same merge as a pure function over state dicts -----------------------------------


def merge_state_dicts(
    base_state: dict[str, Tensor], adapter_tensors: dict[str, Tensor], peft_config: dict
) -> dict[str, Tensor]:
    """Merge a PEFT-format LoRA adapter into a plain state dict, with no model object.

    ``adapter_tensors`` and ``peft_config`` are what ``adapter_model.safetensors`` and
    ``adapter_config.json`` hold. Returns a new dict with the same keys as ``base_state``.
    """
    merged = dict(base_state)
    r_default, alpha_default = peft_config["r"], peft_config["lora_alpha"]
    rslora = peft_config.get("use_rslora", False)
    transposed = peft_config.get("fan_in_fan_out", False)
    for key, A in adapter_tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith((".lora_B.weight", ".lora_embedding_B")):
            continue  # read together with its A
        if name.endswith(".lora_A.weight"):
            module, b_key = name.removesuffix(".lora_A.weight"), key.replace(".lora_A.", ".lora_B.")
        elif name.endswith(".lora_embedding_A"):
            module, b_key = name.removesuffix(".lora_embedding_A"), key[:-1] + "B"
        else:  # a trained bias or a module trained in full replaces the base tensor
            target = name.replace(".base_layer.", ".")
            if target not in base_state:
                raise KeyError(f"adapter tensor {key!r} has no base tensor {target!r}")
            merged[target] = A.to(base_state[target].dtype)
            continue
        B = adapter_tensors[b_key]
        r = pattern_value(peft_config.get("rank_pattern") or {}, module, r_default)
        alpha = pattern_value(peft_config.get("alpha_pattern") or {}, module, alpha_default)
        scale = alpha / r**0.5 if rslora else alpha / r
        weight_key = f"{module}.weight"
        if weight_key not in base_state:
            raise KeyError(f"adapter tensor {key!r} has no base weight {weight_key!r}")
        weight = base_state[weight_key]
        tied = [k for k, t in base_state.items() if k != weight_key and _same_storage(t, weight)]
        if tied:
            raise MergeError(
                f"cannot merge into {weight_key!r}: it is tied to {tied}, which would keep "
                "the unmerged weight; untie the weights first"
            )
        if A.dim() == 4:
            delta = conv2d_delta(A, B, scale)
        elif name.endswith("lora_embedding_A"):
            delta = low_rank_product(A, B, scale).T
        else:
            delta = low_rank_product(A, B, scale)
            delta = delta.T if transposed else delta
        if delta.shape != weight.shape:
            raise ValueError(
                f"adapter tensor {key!r} gives ΔW of shape {tuple(delta.shape)} but base "
                f"weight {weight_key!r} has shape {tuple(weight.shape)}"
            )
        merged[weight_key] = (weight.float() + delta).to(weight.dtype)
    return merged


def _same_storage(a: Tensor, b: Tensor) -> bool:
    # A state dict holds tied weights as two keys over one storage (GPT-2's wte, lm_head).
    return a.device.type != "meta" and a.data_ptr() == b.data_ptr() and a.shape == b.shape
