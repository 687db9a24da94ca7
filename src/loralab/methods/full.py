"""Full fine-tuning (FT) and FT-Top2: the paper's reference points (Sec. 5.1).

FT trains every parameter; FT-Top2 only the last two transformer blocks (the number is
``MethodSettings.top_layers``). Both leave a plain model of the original architecture,
so there is nothing to merge; the "adapter" file of FT is the whole model.
"""

from __future__ import annotations

from torch import nn

from ..lora import frozen_base as bases
from ..lora.architectures import transformer_blocks
from ..lora.config import ConfigError, LoraConfig
from .method import MethodSettings, PlainMethod, record_method
from .trained_weights import freeze, head_parameters, unfreeze_head


def _unique_numel(modules: list[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for parameter in module.parameters():
            seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


def _refuse_packed(method: str, module: nn.Module) -> None:
    reason = bases.packed_in(module)
    if reason is not None:
        raise ConfigError(
            f"method={method!r} trains the base's weights, but {reason}. Train an adapter "
            "over the packed base (lora, dora, bitfit, …) instead"
        )


class FullFineTuning(PlainMethod):
    name = "full"
    summary = "FT: every parameter trains"
    mergeable = True  # the result is a plain model: nothing to merge
    adds_depth = False
    uses_lora = False
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        _refuse_packed(self.name, model)

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        model.requires_grad_(True)
        record_method(model, self.name, settings, None)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        # |Θ| = |Φ0|: every parameter, a tied embedding/head once.
        return _unique_numel([model])


class TopLayersFineTuning(PlainMethod):
    name = "ft-top2"
    summary = "FT-Top2: only the last transformer blocks train (top_layers, default 2)"
    mergeable = True
    adds_depth = False
    uses_lora = False
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        blocks = transformer_blocks(model)
        if settings.top_layers > len(blocks):
            raise ConfigError(
                f"top_layers={settings.top_layers} is more than the model's {len(blocks)} blocks"
            )
        for _, block in blocks[-settings.top_layers :]:
            _refuse_packed(self.name, block)

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        self.check(model, settings, lora, 0)
        freeze(model)
        for _, block in transformer_blocks(model)[-settings.top_layers :]:
            block.requires_grad_(True)
        unfreeze_head(model)  # a classifier's new head always trains
        record_method(model, self.name, settings, None)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        top = [block for _, block in transformer_blocks(model)[-settings.top_layers :]]
        return _unique_numel(top) + head_parameters(model)
