"""Several named adapters on one frozen base: list, switch, disable, delete and combine
them (each batch row with its own adapter: ``mixing.py``; hot-swapping from a file and
saving or loading them all: ``files/hot_swap.py``, ``files/adapter_sets.py``).

Every adapter lives in the same ``LoraLayer`` wrappers (``layer.lora[name]``), so this
module only moves the ``active_adapter`` pointers, merges and unmerges, and reads and
writes the factors' tensors (``factors.tensors()``), whatever kind of factors they are.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoraConfig
from .inject import adapter_configs, lora_layers, replace_module, require_adapter
from .layers import (
    LoraFusedLinear,
    LoraLayer,
    TrainableCopy,
)
from .state import model_state

# -- which adapters there are, and which one runs ----------------------------------------------


@dataclass
class AdapterInfo:
    """One adapter on a model, as ``list_adapters`` describes it."""

    name: str
    active: bool
    merged: bool
    modules: int
    ranks: tuple[int, ...]
    target_modules: list[str] | str

    def __str__(self) -> str:
        flags = ", ".join(f for f, on in (("active", self.active), ("merged", self.merged)) if on)
        return (
            f"{self.name}: {self.modules} modules, r={'/'.join(map(str, self.ranks))}, "
            f"targets={self.target_modules}" + (f" [{flags}]" if flags else "")
        )


def list_adapters(model: nn.Module) -> list[AdapterInfo]:
    """Every adapter on ``model`` with its ranks, targets and state."""
    layers = lora_layers(model).values()
    infos = []
    for name, config in adapter_configs(model).items():
        holding = [layer for layer in layers if name in layer.lora]
        infos.append(
            AdapterInfo(
                name=name,
                active=any(layer.active_adapter == name for layer in holding),
                merged=any(name in layer.merged_adapters for layer in holding),
                modules=len(holding),
                ranks=tuple(sorted({layer.lora[name].r for layer in holding})),
                target_modules=config.target_modules,
            )
        )
    return infos


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model runs now (None: the bare base)."""
    state = model_state(model)
    return state.active if state.active_chosen else next(iter(state.adapters), None)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Run ``name`` from now on (None: the bare base).

    If an adapter is merged, switching unmerges it and merges the new one, so the model
    keeps its zero-latency form; the base weights are restored to within rounding.
    """
    if name is not None:
        require_adapter(model, name)
    layers = lora_layers(model).values()
    was_merged = any(layer.merged_adapters for layer in layers)
    for layer in layers:
        for merged in list(layer.merged_adapters):
            layer.unmerge(merged)
        layer.active_adapter = name if name in layer.lora else None
    for module in model.modules():
        if isinstance(module, TrainableCopy):
            module.active_adapter = name if name in module.copies else None
    state = model_state(model)
    state.active, state.active_chosen = name, True
    if was_merged and name is not None:
        _merge_active(model, name)


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the block; the active adapter comes back after,
    merged again if it was merged."""
    previous = active_adapter(model)
    was_merged = any(layer.merged_adapters for layer in lora_layers(model).values())
    set_active_adapter(model, None)
    try:
        yield
    finally:
        set_active_adapter(model, previous)
        if was_merged and previous is not None:
            _merge_active(model, previous)


def _merge_active(model: nn.Module, name: str) -> None:
    for layer in lora_layers(model).values():
        if name in layer.lora:
            layer.merge(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter (unmerging it first); a wrapper left with none is unwrapped."""
    require_adapter(model, name)
    # innermost first: a nested wrapper (an expert stack's) leaves before the one around it
    for module_name, layer in reversed(list(lora_layers(model).items())):
        if name not in layer.lora:
            continue
        layer.unmerge(name)
        layer.restore_base(name)  # W0 as it was before a PiSSA or OLoRA init
        del layer.lora[name]
        if layer.active_adapter == name:
            layer.active_adapter = None
        if not len(layer.lora):
            replace_module(model, module_name, layer.base_layer)
    for module_name, module in list(model.named_modules()):
        if isinstance(module, TrainableCopy) and name in module.copies:
            del module.copies[name]
            if module.active_adapter == name:
                module.active_adapter = None
            if not len(module.copies):
                replace_module(model, module_name, module.original)
    del adapter_configs(model)[name]
    if active_adapter(model) == name:
        state = model_state(model)
        state.active, state.active_chosen = None, True


# -- combining ------------------------------------------------------------------------------------


@dataclass
class CombineResult:
    """What ``combine_adapters`` built: the new adapter's name and, when compressed,
    the relative Frobenius error of the re-factored ``Σ wᵢ ΔWᵢ`` (0 when exact)."""

    name: str
    relative_error: float
    ranks: dict[str, int]


def combine_adapters(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    rank: int | None = None,
) -> CombineResult:
    """A new adapter computing ``Σ wᵢ ΔWᵢ`` over the given adapters.

    Exact (``rank=None``): the scaled factors are concatenated, so the rank is ``Σ rᵢ``.
    Compressed (``rank=k``): the same sum is re-factored to rank ``k`` by SVD, and the
    relative error ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` (over all modules) is reported.
    """
    configs, layers = _combinable(model, names, weights, new_name, rank)
    built: dict[str, tuple[Tensor, Tensor]] = {}
    error_sq = total_sq = 0.0
    for module_name, layer in layers.items():
        present = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.lora]
        A, B = _concatenated(layer, present)
        if rank is not None:
            A, B, err, tot = _compressed(layer, A, B, rank)
            error_sq, total_sq = error_sq + err, total_sq + tot
        built[module_name] = (A, B)
    ranks = {module: _rank_of(layer, built[module][0]) for module, layer in layers.items()}
    base_config = configs[0]
    r_default = max(ranks.values())
    # Scale 1: the weights and scales are already inside B, so α = r for every module.
    combined = LoraConfig(
        r=r_default,
        lora_alpha=r_default,
        target_modules=sorted(layers),
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r_default},
        alpha_pattern={re.escape(m): r for m, r in ranks.items() if r != r_default},
        use_rslora=False,
        init=base_config.init,
    )
    for module_name, layer in layers.items():
        r = ranks[module_name]
        layer.add_adapter(new_name, r, r, 1.0, 0.0, "kaiming")
        with torch.no_grad():
            held = layer.lora[new_name].tensors()  # a plain LoRA adapter: A and B
            held["A"].copy_(built[module_name][0])
            held["B"].copy_(built[module_name][1])
        layer.lora[new_name].requires_grad_(False)
    adapter_configs(model)[new_name] = combined
    relative = (error_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return CombineResult(new_name, relative, ranks)


def _combinable(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    rank: int | None,
) -> tuple[list[LoraConfig], dict[str, LoraLayer]]:
    """The adapters' configs and the layers holding any of them, once every check passed
    (nothing is built before)."""
    if len(names) != len(weights) or not names:
        raise ValueError(f"give one weight per adapter: {len(names)} names, {len(weights)} weights")
    configs = [require_adapter(model, name, "combined") for name in names]
    if new_name in adapter_configs(model):
        raise ValueError(f"an adapter named {new_name!r} already exists")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    layers = {n: layer for n, layer in lora_layers(model).items()
              if any(name in layer.lora for name in names)}  # fmt: skip
    for module_name, layer in layers.items():
        missing = [name for name in names if name not in layer.lora]
        if missing and isinstance(layer, LoraFusedLinear):
            raise ValueError(f"{module_name!r}: fused parts need every adapter; {missing} lack it")
        for name in (n for n in names if n in layer.lora):
            _check_combinable(layer, name, module_name)
    return configs, layers


def _check_combinable(layer: LoraLayer, name: str, module_name: str) -> None:
    if not layer.lora[name].is_product:
        kind = type(layer.lora[name]).__name__
        raise ValueError(
            f"adapter {name!r} cannot be combined: its ΔW in {module_name!r} ({kind}) is not "
            "a product of two factors"
        )
    if name in layer.rewrote:
        raise ValueError(
            f"adapter {name!r} cannot be combined: its init rewrote the base weight of "
            f"{module_name!r}, which the others do not expect; save it (converted to a "
            "plain LoRA) and load that"
        )


def _rank_of(layer: LoraLayer, A: Tensor) -> int:
    return A.shape[1] if isinstance(layer, LoraFusedLinear) else A.shape[0]


def _concatenated(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[Tensor, Tensor]:
    """[A₁; A₂; …] and [w₁s₁B₁, w₂s₂B₂, …]: their product is Σ wᵢ sᵢ Bᵢ Aᵢ exactly."""
    rank_dim_a = 1 if isinstance(layer, LoraFusedLinear) else 0
    rank_dim_b = B_RANK_DIM.get(type(layer), 1)
    As, Bs = [], []
    for name, weight in present:
        A, B = layer.lora[name].low_rank()  # the scale is inside B
        As.append(A.detach().float())
        Bs.append(B.detach().float() * weight)
    return torch.cat(As, dim=rank_dim_a), torch.cat(Bs, dim=rank_dim_b)


# B's rank dimension per layer type: (out, r) and (out, r, 1, 1) use 1; fused (p, o, r) 2.
B_RANK_DIM = {LoraFusedLinear: 2}


def _compressed(layer: LoraLayer, A: Tensor, B: Tensor, rank: int):
    """Re-factor ``B A`` to rank ``rank`` by truncated SVD; also the squared errors."""
    if isinstance(layer, LoraFusedLinear):
        parts = [_compressed_matrix(B[i], A[i], rank) for i in range(A.shape[0])]
        new_a = torch.stack([p[0] for p in parts])
        new_b = torch.stack([p[1] for p in parts])
        return new_a, new_b, sum(p[2] for p in parts), sum(p[3] for p in parts)
    conv = A.dim() == 4
    a2, b2 = (A.flatten(1), B.flatten(1)) if conv else (A, B)
    new_a, new_b, err, tot = _compressed_matrix(b2, a2, rank)
    if conv:
        new_a = new_a.view(new_a.shape[0], *A.shape[1:])
        new_b = new_b.view(*new_b.shape, 1, 1)
    return new_a, new_b, err, tot


def _compressed_matrix(B: Tensor, A: Tensor, rank: int):
    delta = (B @ A).double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    new_b = (U[:, :k] * S[:k]).float()
    new_a = Vh[:k].float()
    if k < rank:  # keep the asked rank: pad with zero directions
        new_b = F.pad(new_b, (0, rank - k))
        new_a = F.pad(new_a, (0, 0, 0, rank - k))
    error = float((S[k:] ** 2).sum())
    return new_a, new_b, error, float((S**2).sum())
