"""AdaLoRA's layer, ``h = W0 x + α / (r + 1e-5) · P diag(Λ) Q x`` around a frozen
``Linear`` or GPT-2 ``Conv1D``, and putting it on a model (planned first, so a config that
does not fit leaves the model unchanged), with the budget's state kept on the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...lora import frozen_base as bases
from ...lora.config import ConfigError, LoraConfig
from ...lora.inits import Init
from ...lora.inject import Target, TargetError, adapter_configs, apply_targets, plan_targets
from ...lora.layers import LoraLinear
from ...lora.merge import merge_and_unload
from ...lora.state import has_state, model_state
from ..lora import with_head
from ..trained_weights import head_parameters
from .budget import RankAllocator
from .config import ADAPTER_NAME, AdaLoraConfig

# -- the layer ------------------------------------------------------------------------------


class SvdFactors(nn.Module):
    """One matrix's singular triplets: P (out, r), Λ's diagonal ``E`` (r,), Q (r, in).

    ``E`` is PEFT's ``lora_E``; ``mask`` marks the triplets the last allocation kept
    (pruned ones have Λ_i = 0 right after it; they may regrow until the next one).
    """

    peft_names: Mapping[str, str] = {"Q": "lora_A", "P": "lora_B", "E": "lora_E"}
    """PEFT's ADALORA names (its files keep only the kept triplets: ``files.py``)."""
    reads_weight = False

    def __init__(
        self,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        r: int,
        alpha: float,
        scale: float,
        dropout: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        (_, in_features), (out_features, _) = a_shape, b_shape
        # P and Q random, Λ zero, so ΔW = 0 at step 0 (AdaLoRA Sec. 3.1; PEFT's N(0, 0.02)).
        self.P = nn.Parameter(torch.randn(out_features, r, device=device, dtype=dtype) * 0.02)
        self.E = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.Q = nn.Parameter(torch.randn(r, in_features, device=device, dtype=dtype) * 0.02)
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=device), False)
        self.r = r
        self.alpha = alpha
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def tensors(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.peft_names}

    @staticmethod
    def delta_from(tensors: Mapping[str, Tensor], scale: float, weight: Tensor | None) -> Tensor:
        """``ΔW = scale · P diag(Λ) Q`` in fp32, (out, in)."""
        P, E, Q = (tensors[name].float() for name in ("P", "E", "Q"))
        return (P * E) @ Q * scale

    def delta(self, weight: Tensor | None) -> Tensor:
        return self.delta_from(self.tensors(), self.scale, weight)

    @property
    def rank(self) -> int:
        """Triplets kept by the last allocation."""
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


class SvdLinear(LoraLinear):
    """AdaLoRA around ``nn.Linear`` or GPT-2's ``Conv1D``: LoRA's geometry (Q is (r, in)
    where A is, P (out, r) where B is), with its own factors and low-rank path."""

    factors_class = SvdFactors
    one_plain_matrix = False  # P diag(Λ) Q: AdaLoRA's triplets start as it makes them

    def init_factors(self, factors: SvdFactors, init: Init) -> None:
        pass  # ``init`` is LoRA's choice for A; AdaLoRA's triplets start as SvdFactors makes them

    def _lora_input(self, x: Tensor, factors: SvdFactors) -> Tensor:
        return x.to(factors.Q.dtype)

    def lora_update(self, x: Tensor, factors: SvdFactors) -> Tensor:
        hidden = F.linear(factors.dropout(x), factors.Q) * factors.E  # (…, in) -> (…, r)
        return F.linear(hidden, factors.P) * factors.scale  # (…, out)


def svd_factors(model: nn.Module) -> dict[str, SvdFactors]:
    """Every adapted matrix's triplets, by module name (as in the user's model)."""
    return {
        name: module.lora[ADAPTER_NAME]
        for name, module in model.named_modules()
        if isinstance(module, SvdLinear) and ADAPTER_NAME in module.lora
    }


# -- applying it ----------------------------------------------------------------------------


def plan_adalora(
    model: nn.Module, config: AdaLoraConfig, strict: bool = True
) -> tuple[LoraConfig, list[Target]]:
    """Resolve ``config`` against ``model`` without changing it (``TargetError`` if it does
    not fit): the targets as the core planner reads them, and one ``SvdLinear`` per matrix.

    ``strict=False`` reads a loaded file's targets as PEFT does (``plan_targets``).
    """
    if adapter_configs(model):
        raise ConfigError(
            f"the model already has adapters {sorted(adapter_configs(model))}; AdaLoRA must "
            "be the only one (unload them first)"
        )
    targets_config = with_head(model, config.targets())
    planned = []
    for target in plan_targets(model, targets_config, ADAPTER_NAME, strict=strict):
        base = target.layer.base_layer
        if target.parts is not None:
            leaf = target.name.rsplit(".", 1)[-1]
            raise TargetError(
                f"AdaLoRA adapts whole matrices, not the parts {list(target.parts.enabled)} "
                f"of the fused {target.name!r}; target {leaf!r} whole, as PEFT does"
            )
        if not bases.is_linear_map(base):  # dense, GPT-2's Conv1D, or packed
            raise TargetError(
                f"module {target.name!r} is a {type(base).__name__}; AdaLoRA adapts Linear and "
                "GPT-2's Conv1D"
            )
        planned.append(dataclasses.replace(target, layer=SvdLinear(base)))
    return targets_config, planned


def apply_adalora(model: nn.Module, config: AdaLoraConfig, strict: bool = True) -> nn.Module:
    """Wrap the chosen matrices with AdaLoRA and freeze the rest, in place; return ``model``.

    On an error (a name that matches nothing, a rank above a matrix's size) the model is
    unchanged. At step 0 the model computes what the base computed (Λ = 0).
    """
    targets_config, planned = plan_adalora(model, config, strict)
    apply_targets(model, targets_config, planned, ADAPTER_NAME)
    model_state(model).method_state = RankAllocator(config)
    return model


def adalora_state(model: nn.Module) -> RankAllocator:
    """The importance scores and schedule of the model's AdaLoRA (set by ``apply_adalora``)."""
    state = model_state(model).method_state if has_state(model) else None
    if not isinstance(state, RankAllocator):
        raise ValueError("the model carries no AdaLoRA: apply it first (apply_adalora)")
    return state


def adalora_config(model: nn.Module) -> AdaLoraConfig:
    """The ``AdaLoraConfig`` the model's AdaLoRA was applied with."""
    return adalora_state(model).config


def merge_adalora(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every ``ΔW = P Λ Q`` into its base weight and remove the wrappers: the plain
    model with its original modules and keys, and no added latency."""
    merge_and_unload(model, safe=safe)
    model_state(model).method_state = None
    return model


def adalora_parameters(model: nn.Module, config: AdaLoraConfig) -> int:
    """Trainable parameters AdaLoRA adds: Σ init_r · (d + k + 1) over the matrices (P, Q and
    Λ), plus a classifier's new head. Pruning masks Λ entries; it does not shrink them."""
    _, planned = plan_adalora(model, config)
    total = 0
    for target in planned:
        (r, k), (d, _) = target.layer.factor_shapes(target.r)
        total += r * (d + k + 1)
    return total + head_parameters(model)
