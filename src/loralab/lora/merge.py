"""Merging: ``W = W0 + ΔW`` for zero added latency, and back.

Merging is explicit and idempotent, never a side effect of ``.eval()``. A layer remembers
what it added (``layers.MergedDelta``), so unmerging subtracts exactly that. It also
exists as a pure function over state dicts (``files/state_dict_merge.py``), so an export needs no
model.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import frozen_base as bases
from .inject import adapter_configs, lora_layers, replace_module, restore_requires_grad
from .layers import (
    LoraLayer,
    MergeError,
    TrainableCopy,
)
from .state import model_state


def _tied_elsewhere(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every module path that holds it (only those held more than once)."""
    holders: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(name)
    return {key: names for key, names in holders.items() if len(names) > 1}


class QuantizationLossWarning(UserWarning):
    """Merged weights were re-quantized, which loses part of the adapter's update."""


def _layers_to_merge(
    model: nn.Module, adapter_name: str | None, safe: bool, into_dense_copy: bool = False
) -> dict[str, tuple[LoraLayer, str | None]]:
    """Every LoRA layer with the adapter to merge into it (None: nothing), after the checks
    that must pass before any weight changes. ``into_dense_copy``: a quantized base will
    be replaced by a dense copy first, so it is no reason to refuse."""
    if adapter_name is not None and adapter_name not in adapter_configs(model):
        raise KeyError(
            f"no adapter named {adapter_name!r}; the model has {sorted(adapter_configs(model))}"
        )
    layers = lora_layers(model)
    tied = _tied_elsewhere(model)
    for name, layer in layers.items():
        fixed = layer.fixed_reason()
        if fixed is not None and not into_dense_copy:
            raise MergeError(f"cannot merge into {name!r}: {fixed}")
        weight = layer.stored_weight()
        holders = [h for h in tied.get(id(weight), []) if not h.startswith(name)]
        if holders:
            raise MergeError(
                f"cannot merge into {name!r}: its weight is tied to {holders}, so merging "
                "would change the other module too; untie the weights first"
            )
    chosen = {}
    for name, layer in layers.items():
        adapter = adapter_name or layer.active_adapter
        chosen[name] = (layer, adapter if adapter in layer.lora else None)
    if safe:
        # A first pass over every ΔW, so that a bad one leaves all weights untouched; the
        # deltas are recomputed when merging rather than held, which would double memory.
        for name, (layer, adapter) in chosen.items():
            if adapter is None or adapter in layer.merged:
                continue
            if not torch.isfinite(layer.delta_weight(adapter)).all():
                raise MergeError(
                    f"adapter {adapter!r} has a non-finite ΔW (NaN or Inf) in {name!r}; "
                    "nothing was merged"
                )
    return chosen


def merge_adapter(model: nn.Module, adapter_name: str | None = None, safe: bool = False) -> None:
    """Add each layer's ``ΔW`` into its base weight (the active adapter by default).

    With ``safe=True`` every ``ΔW`` is checked for NaN/Inf first and nothing is merged
    if one is bad. A weight tied to another module (GPT-2's ``wte`` and ``lm_head``) is
    refused: merging would change both, while the unmerged update only touched one.
    """
    for layer, adapter in _layers_to_merge(model, adapter_name, safe).values():
        if adapter is not None:
            layer.merge(adapter)


def unmerge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Subtract merged updates again (all merged adapters when no name is given)."""
    for layer in lora_layers(model).values():
        for adapter in list(reversed(layer.merged_adapters)):
            if adapter_name is None or adapter == adapter_name:
                layer.unmerge(adapter)


def merge_and_unload(
    model: nn.Module,
    adapter_name: str | None = None,
    safe: bool = False,
    requantize: bool = False,
) -> nn.Module:
    """Merge, then put the original modules back: a plain model with its original keys.

    Each layer is unwrapped as soon as it is merged, so what it remembers of the merge is
    freed at once rather than held for the whole model.

    A quantized base (a GGUF file's packed blocks, bitsandbytes' layers) cannot take ΔW in
    its own format without losing most of it, so by default the whole model comes back
    dense: each adapted layer is merged into its unpacked weight, exactly, and every other
    quantized layer is unpacked too. ``requantize=True`` stores the merged weights in the
    base's format again instead (the rest stays as it was), and warns with how much of
    ΔW the rounding lost.
    """
    lost = _Loss()
    chosen = _layers_to_merge(model, adapter_name, safe, True)
    layers = set(chosen)
    for name, (layer, adapter) in chosen.items():
        quantized = layer.base_layer
        if bases.is_packed(quantized):
            layer.base_layer = bases.dense_copy(quantized)
        else:
            quantized = None
        if adapter is not None:
            before = lost.before(layer, adapter, quantized is not None and requantize)
            layer.merge(adapter)
            layer.rewrote.pop(adapter, None)  # merged: W0 - start + ΔW is the trained weight
        for other in list(layer.rewrote):
            layer.restore_base(other)
        merged = layer.original
        if quantized is not None and requantize:
            merged = bases.quantized_like(quantized, merged)
            if adapter is not None:
                lost.add(before, bases.weight_matrix(merged))
        if not inside_wrapper(name, layers):  # the outermost of nested wrappers (experts)
            replace_module(model, name, merged)
    if not requantize:
        dequantize_model(model)
    lost.warn()
    return _remove_wrappers(model, keep_trained_copies=True)


class _Loss:
    """How much of ΔW re-quantizing the merged weights lost, over every layer."""

    def __init__(self) -> None:
        self.error = self.update = 0.0
        self.layers = 0

    def before(self, layer: LoraLayer, adapter: str, measuring: bool):
        if not measuring:
            return None
        # The base is the dense copy here, an nn.Linear: ΔW's layout is its own, (out, in).
        return bases.weight_copy(layer.base_layer), layer.delta_weight(adapter).detach().float()

    def add(self, before, merged: torch.Tensor) -> None:
        weight, delta = before
        self.error += float((merged - weight - delta).square().sum())
        self.update += float(delta.square().sum())
        self.layers += 1

    def warn(self) -> None:
        if not self.layers:
            return
        ratio = math.sqrt(self.error / self.update) if self.update else 0.0
        warnings.warn(
            f"re-quantized {self.layers} merged weights into the base's format: the "
            f"rounding error is {ratio:.0%} of the adapter's update ‖ΔW‖; merge without "
            "re-quantizing for the exact result",
            QuantizationLossWarning,
            stacklevel=3,
        )


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of ``model`` by a dense one holding its unpacked
    weight, and forget a Transformers model's quantization config (its ``save_pretrained``
    then writes a plain float model)."""
    for name, module in list(model.named_modules()):
        if bases.is_packed(module):
            replace_module(model, name, bases.dense_copy(module))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model_state(model).base_quantization = None
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model as it was (to the last bit,
    unless an init rewrote it: PiSSA's and OLoRA's are added back, up to rounding)."""
    unmerge_adapter(model)
    for layer in lora_layers(model).values():
        for name in list(layer.rewrote):
            layer.restore_base(name)
    return _remove_wrappers(model, keep_trained_copies=False)


def inside_wrapper(name: str, wrappers) -> bool:
    """Whether the LoRA layer called ``name`` is the ``base_layer`` of another one (a
    nested wrapper: each adapted weight of an expert stack has its own)."""
    parent, _, child = name.rpartition(".")
    return child == "base_layer" and parent in wrappers


def _remove_wrappers(model: nn.Module, keep_trained_copies: bool) -> nn.Module:
    wrappers = set(lora_layers(model))
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableCopy):
            replacement = module.active_module() if keep_trained_copies else module.original
            replace_module(model, name, replacement)
        elif isinstance(module, LoraLayer) and not inside_wrapper(name, wrappers):
            replace_module(model, name, module.original)
    restore_requires_grad(model)
    state = model_state(model)
    state.adapters.clear()
    state.active, state.active_chosen = None, False  # a new adapter becomes active again
    return model
