"""DoRA (Liu et al., ICML 2024): weight-decomposed LoRA, beside the LoRA layers.

The adapted weight is a direction times a learned length per output row:

    W = m · (W0 + s·B A) / ‖W0 + s·B A‖        (the norm of each row, over the inputs)

with ``m`` trainable and initialised to ‖W0‖ per row, so that W = W0 at step 0 (B = 0).
As in the paper (Sec. 4.3) and PEFT, the norm is treated as a constant in the backward
pass. The forward adds, to the base layer's output ``W0 x + b``,

    (m/‖·‖ − 1) · W0 x + (m/‖·‖) · s · B A x

which is the formula above without forming W. PEFT's files hold ``m`` as
``<module>.lora_magnitude_vector`` (no ``.weight``) beside ``lora_A``/``lora_B``, and
``use_dora: true`` in the config; loralab reads and writes them both ways.

For ``Linear`` and GPT-2's ``Conv1D``. ΔW depends on W0, which merging remembers (so
unmerging is exact); ΔW is not a product of two factors, so a DoRA adapter cannot be mixed
per batch row or combined with others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import frozen_base as bases
from .layers import LoraFactors, LoraLinear, low_rank_product, register_factors


@register_factors
class DoraFactors(LoraFactors):
    """LoRA's ``A`` and ``B`` and DoRA's magnitude ``m`` (out,), one length per row."""

    peft_names: Mapping[str, str] = {
        **LoraFactors.peft_names,
        "magnitude": "lora_magnitude_vector",
    }
    reads_weight = True
    is_product = False  # ΔW rescales W0's rows: no product B' A'

    def __init__(self, a_shape, b_shape, r, alpha, scale, dropout, device, dtype) -> None:
        super().__init__(a_shape, b_shape, r, alpha, scale, dropout, device, dtype)
        self.magnitude = nn.Parameter(torch.ones(b_shape[0], device=device, dtype=dtype))

    @staticmethod
    def tensor_shapes(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> dict[str, tuple]:
        return {**LoraFactors.tensor_shapes(a_shape, b_shape), "magnitude": (b_shape[0],)}

    @staticmethod
    def delta_from(tensors: Mapping[str, Tensor], scale: float, weight: Tensor | None) -> Tensor:
        """``m · (W0 + s·B A) / ‖W0 + s·B A‖ − W0`` per row: what merging adds to W0."""
        adapted = weight + low_rank_product(tensors["A"], tensors["B"], scale)
        length = tensors["magnitude"].float() / adapted.norm(dim=1)
        return length[:, None] * adapted - weight

    def low_rank(self) -> tuple[Tensor, Tensor]:
        raise TypeError("DoRA's ΔW rescales the rows of W0: it is not a product B' A'")


class DoraLinear(LoraLinear):
    """DoRA around ``nn.Linear`` (or GPT-2's ``Conv1D``)."""

    factors_class = DoraFactors
    one_plain_matrix = False  # ΔW rescales W0's rows: no plain B·A for an init to start

    def add_adapter(
        self, name: str, r: int, alpha: float, scale: float, dropout: float, init: str
    ) -> None:
        super().add_adapter(name, r, alpha, scale, dropout, init)
        with torch.no_grad():  # m = ‖W0‖ per row, so that W = W0 at step 0
            self.lora[name].magnitude.copy_(bases.weight_matrix(self.base_layer).norm(dim=1))

    def adapted(self, x: Tensor, result: Tensor, factors: DoraFactors) -> Tensor:
        x = self._lora_input(x, factors)
        weight = bases.weight_matrix(self.base_layer).to(x.dtype)  # (out, in), frozen
        with torch.no_grad():  # the norm is a constant in the backward pass (Sec. 4.3)
            norm = (weight + low_rank_product(factors.A, factors.B, factors.scale)).norm(dim=1)
        length = factors.magnitude / norm  # (out,)
        dropout = factors.dropout
        if isinstance(dropout, nn.Identity) or not dropout.training:
            dropped = x
            base = result.to(x.dtype)  # W0 x + b: the bias is not rescaled
            bias = bases.bias_of(self.base_layer)
            base = base - bias.to(x.dtype) if bias is not None else base
        else:  # the dropped input goes through W0 again, as in PEFT
            dropped = dropout(x)
            base = F.linear(dropped, weight)
        update = F.linear(F.linear(dropped, factors.A), factors.B) * factors.scale
        return result + ((length - 1) * base + length * update).to(result.dtype)


class DoraConv1D(DoraLinear):
    """DoRA around GPT-2's ``Conv1D`` (``frozen_base.py`` reads its transposed weight)."""


def dora_class_for(module: nn.Module) -> type[DoraLinear] | None:
    """The DoRA wrapper for a module, by what its kind of base computes; None where DoRA
    is not supported."""
    kind = bases.kind_or_none(module)
    return {"linear": DoraLinear, "conv1d": DoraConv1D}.get(kind.role) if kind else None
