"""The paper's reference code's checkpoints (``loralib``, Microsoft's LoRA repository):
its own tensor names, its GPT-2 with the fused ``c_attn`` whose q and v parts carry the
factors, read into an adapter on a Transformers model.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

from ..lora import frozen_base as bases
from ..lora.config import ConfigError, LoraConfig
from ..lora.inject import (
    apply_targets,
    base_module_names,
    lora_layers,
    plan_targets,
)
from .adapter_dir import read_tensors
from .peft_config import AdapterFileError


def import_loralib(
    model: nn.Module,
    source: str | os.PathLike | dict[str, Tensor],
    lora_alpha: float,
    adapter_name: str = "default",
    fused_parts: tuple[str, ...] | None = None,
) -> nn.Module:
    """Load a ``loralib`` state dict (``torch.save(lora.lora_state_dict(model))``).

    Keys are ``<module>.lora_A`` / ``<module>.lora_B``, with no prefix and no config, so
    the rank is read from the shapes and ``lora_alpha`` must be given (the paper's GPT-2
    runs used r=4, α=32). GPT-2's fused ``c_attn`` is loralib's ``MergedLinear``: its
    ``lora_A`` stacks the enabled parts' A row-wise (p·r, in) and its ``lora_B`` their B
    (p·d, r), by default the q and v parts (``enable_lora=[True, False, True]``).
    """
    label = str(source) if not isinstance(source, dict) else "loralib state dict"
    tensors = source if isinstance(source, dict) else read_tensors(source)
    modules = base_module_names(model)
    targets, ranks, factors = [], {}, {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A")):
        name = key.removesuffix(".lora_A")
        target, r, pair = _loralib_module(modules, tensors, name, fused_parts, label)
        targets.append(target)
        ranks[name], factors[name] = r, pair
    leftover = [k for k in tensors if not k.endswith((".lora_A", ".lora_B"))]
    if leftover or not targets:
        raise AdapterFileError(
            f"{label}: no loralib LoRA tensors, or unexpected keys {leftover[:3]}"
        )
    r_default = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=r_default,
        lora_alpha=lora_alpha,
        target_modules=targets,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r_default},
    )
    try:
        planned = plan_targets(model, config, adapter_name)
    except ConfigError as error:
        raise AdapterFileError(f"{label}: {error}") from None
    for target in planned:
        A, B = factors[target.name]
        layer_a, layer_b = target.layer.factor_shapes(target.r)
        if tuple(A.shape) != layer_a or tuple(B.shape) != layer_b:
            raise AdapterFileError(
                f"{label}: {target.name}: factors {tuple(A.shape)}, {tuple(B.shape)} do not "
                f"fit the model's {layer_a}, {layer_b}"
            )
    apply_targets(model, config, planned, adapter_name)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (A, B) in factors.items():
            held = layers[name].lora[adapter_name].tensors()
            held["A"].copy_(A)  # loralib's are LoRA's own two factors
            held["B"].copy_(B)
    return model


def _loralib_module(
    modules: dict[str, nn.Module],
    tensors: dict[str, Tensor],
    name: str,
    fused_parts: tuple[str, ...] | None,
    label: str,
) -> tuple[str, int, tuple[Tensor, Tensor]]:
    """One module's target (``c_attn[q,v]`` for a fused part), rank and factors, checked."""
    key = f"{name}.lora_A"
    if name not in modules:
        raise AdapterFileError(f"{label}: {key!r} names no module of the model")
    if f"{name}.lora_B" not in tensors:
        raise AdapterFileError(f"{label}: {key!r} has no matching {name}.lora_B")
    A, B = tensors[key], tensors[f"{name}.lora_B"]
    base = modules[name]
    if A.dim() != 2 or B.dim() != 2:
        raise AdapterFileError(
            f"{label}: {key!r} has shape {tuple(A.shape)}; loralib's ConvLoRA layout "
            "(rank r·k) has no exact LoRA equivalent and is not imported"
        )
    if isinstance(base, nn.Embedding) or B.shape[0] == bases.in_out(base)[1]:
        return name, A.shape[0], (A, B)
    parts = _loralib_parts(base, B, fused_parts, key, label)
    r, size = A.shape[0] // len(parts), B.shape[0] // len(parts)
    pair = (A.reshape(len(parts), r, A.shape[1]), B.reshape(len(parts), size, r))
    return f"{name}[{','.join(parts)}]", r, pair


def _loralib_parts(
    base: nn.Module, B: Tensor, parts: tuple[str, ...] | None, key: str, label: str
) -> tuple[str, ...]:
    layout = ("q", "k", "v")
    out_features = bases.in_out(base)[1]
    part_size = out_features // len(layout)
    count = B.shape[0] // part_size
    if B.shape[0] % part_size:
        raise AdapterFileError(
            f"{label}: {key!r}: lora_B has {B.shape[0]} rows, not a multiple of the part size "
            f"{part_size} of a fused ({out_features} outputs) projection"
        )
    if parts is None:
        defaults = {1: None, 2: ("q", "v"), 3: ("q", "k", "v")}
        parts = defaults.get(count)
        if parts is None:
            raise AdapterFileError(
                f"{label}: {key!r} covers {count} part(s) of the fused projection; pass "
                "fused_parts=(...) to say which"
            )
    if len(parts) != count:
        raise AdapterFileError(f"{label}: {key!r} covers {count} parts, fused_parts={parts}")
    return tuple(parts)
