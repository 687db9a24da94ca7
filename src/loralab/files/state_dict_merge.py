"""Merging a PEFT-format adapter into a plain state dict, with no model object: what
``adapter_model.safetensors`` and ``adapter_config.json`` hold, folded into the base's tensors.
"""

from __future__ import annotations

from torch import Tensor

from ..lora import frozen_base as bases
from ..lora.config import pattern_value
from ..lora.layers import (
    MergeError,
)
from .adapter_dir import factor_tensors_by_module
from .peft_config import PEFT_PREFIX


def merge_state_dicts(
    base_state: dict[str, Tensor], adapter_tensors: dict[str, Tensor], peft_config: dict
) -> dict[str, Tensor]:
    """Merge a PEFT-format LoRA adapter into a plain state dict, with no model object.

    ``adapter_tensors`` and ``peft_config`` are what ``adapter_model.safetensors`` and
    ``adapter_config.json`` hold. Returns a new dict with the same keys as ``base_state``.
    Each module's tensors say which factors they are (LoRA's A and B, DoRA's with a
    magnitude), and those factors compute ΔW.
    """
    if peft_config.get("target_parameters"):
        raise ValueError(
            f"the adapter adapts stacked expert weights (target_parameters="
            f"{peft_config['target_parameters']}), whose per-expert factors a state dict "
            "alone does not lay out; load it on the model and merge_and_unload instead"
        )
    merged = dict(base_state)
    r_default, alpha_default = peft_config["r"], peft_config["lora_alpha"]
    rslora = peft_config.get("use_rslora", False)
    fan_in_fan_out = peft_config.get("fan_in_fan_out", False)
    modules, rest = factor_tensors_by_module(adapter_tensors)
    for key, tensor in rest.items():  # a trained bias or a module trained in full
        target = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        if target not in base_state:
            raise KeyError(f"adapter tensor {key!r} has no base tensor {target!r}")
        merged[target] = tensor.to(base_state[target].dtype)
    for module, factors in modules.items():
        factors_class, tensors = factors.factors_class, factors.tensors
        if factors_class is None:
            raise KeyError(f"adapter tensors {sorted(tensors)} of {module!r} are no known factors")
        r = pattern_value(peft_config.get("rank_pattern") or {}, module, r_default)
        alpha = pattern_value(peft_config.get("alpha_pattern") or {}, module, alpha_default)
        scale = alpha / r**0.5 if rslora else alpha / r
        weight_key = f"{module}.weight"
        if weight_key not in base_state:
            raise KeyError(f"adapter tensors of {module!r} have no base weight {weight_key!r}")
        weight = base_state[weight_key]
        tied = [k for k, t in base_state.items() if k != weight_key and _same_storage(t, weight)]
        if tied:
            raise MergeError(
                f"cannot merge into {weight_key!r}: it is tied to {tied}, which would keep "
                "the unmerged weight; untie the weights first"
            )
        in_out = factors.embedding or (fan_in_fan_out and weight.dim() == 2)
        matrix = bases.matrix_of(weight, in_out)
        if factors_class.reads_weight and weight.dim() != 2:
            raise ValueError(
                f"adapter tensors of {module!r} are {factors_class.__name__}, which merge "
                f"into a matrix; base weight {weight_key!r} has shape {tuple(weight.shape)}"
            )
        product = factors_class.matrix_shape(tensors)  # (out, in)
        if product != tuple(matrix.shape):
            shown = product[::-1] if in_out else product  # a conv's as (out, in · kh · kw)
            raise ValueError(
                f"adapter tensors of {module!r} give ΔW of shape {tuple(shown)} but base "
                f"weight {weight_key!r} has shape {tuple(weight.shape)}"
            )
        reads = matrix if factors_class.reads_weight else None
        delta = factors_class.delta_from(tensors, scale, reads)
        delta = bases.in_weight_layout(delta, tuple(weight.shape), in_out)
        merged[weight_key] = (weight.float() + delta).to(weight.dtype)
    return merged


def _same_storage(a: Tensor, b: Tensor) -> bool:
    # A state dict holds tied weights as two keys over one storage (GPT-2's wte, lm_head).
    return a.device.type != "meta" and a.data_ptr() == b.data_ptr() and a.shape == b.shape
