"""LoRA as a method among the others: the core's ``inject_adapter`` behind the protocol.

|Θ| = Σ r·(d + k) over the adapted matrices (Sec. 4.1); a classifier's new head trains in
full beside it (as ``modules_to_save``, so the adapter file holds it in PEFT's layout).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..lora.architectures import classifier_head
from ..lora.config import LoraConfig
from ..lora.inject import inject_adapter, plan_targets
from .method import MethodSettings, PlainMethod, record_method
from .trained_weights import head_parameters


def with_head(model: nn.Module, lora: LoraConfig) -> LoraConfig:
    """``lora`` with a classifier's new head in ``modules_to_save`` (it must train)."""
    head = classifier_head(model)
    if head is None or lora.modules_to_save:
        return lora
    name = next(n for n, m in model.named_children() if m is head)
    return dataclasses.replace(lora, modules_to_save=[name])


def _require(lora: LoraConfig | None) -> LoraConfig:
    if lora is None:
        raise ValueError("the lora method needs a LoraConfig")
    return lora


class Lora(PlainMethod):
    name = "lora"
    summary = "LoRA: ΔW = (α/r)·B·A on the chosen weights, base frozen"
    mergeable = True
    adds_depth = False
    uses_lora = True
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        plan_targets(model, with_head(model, _require(lora)))  # raises TargetError, no change

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        inject_adapter(model, with_head(model, _require(lora)))
        record_method(model, self.name, settings, lora)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        total = 0
        for target in plan_targets(model, _require(lora)):
            shape_a, shape_b = target.layer.factor_shapes(target.r)
            # A is (r, k) and B is (d, r) per matrix; a fused layer stacks one pair per part.
            parts = shape_a[0] if len(shape_a) == 3 else 1
            d, k = shape_b[-2], shape_a[-1]
            total += parts * target.r * (d + k)
        return total + head_parameters(model)
