"""The registry of layer variants: a config picks its variant, the variant its layer class,
and every consumer asks the factors' capabilities rather than a config's flags."""

from __future__ import annotations

import pytest
import torch

import loralab
from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, TargetError
from loralab.lora import variants
from loralab.lora.inject import lora_layers
from loralab.lora.layers import LoraFactors, LoraLinear


def test_a_config_picks_its_variant():
    assert variants.variant_for(LoraConfig()) is variants.LORA
    assert variants.variant_for(LoraConfig(use_dora=True)) is variants.DORA
    assert variants.DORA.factors_class.is_product is False
    assert variants.LORA.factors_class.is_product is True


class HalfLinear(LoraLinear):
    """A test variant: LoRA's update at half strength."""

    def lora_update(self, x, factors):
        return super().lora_update(x, factors) / 2


def test_a_new_variant_is_its_layer_and_one_registration(monkeypatch):
    tokens = token_batch()
    plain = make_model("llama")  # LoRA at half the scale: what the new variant computes
    loralab.inject_adapter(plain, LoraConfig(r=3, lora_alpha=4, target_modules=["q_proj"]))
    half = variants.Variant(
        "Half",
        lambda config: config.r == 3,  # a test's way to choose it
        LoraFactors,
        lambda module: HalfLinear if isinstance(module, torch.nn.Linear) else None,
        "Linear",
        False,
    )
    monkeypatch.setattr(variants, "VARIANTS", (half, *variants.VARIANTS))
    model = make_model("llama")
    loralab.inject_adapter(model, LoraConfig(r=3, lora_alpha=8, target_modules=["q_proj"]))
    assert all(type(layer) is HalfLinear for layer in lora_layers(model).values())
    randomize_lora(model)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, plain(tokens).logits)
        assert (model(tokens).logits - make_model("llama")(tokens).logits).abs().max() > 1e-3
    config = LoraConfig(r=3, target_modules=["embed_tokens"])
    with pytest.raises(TargetError, match="which Half cannot adapt"):
        loralab.inject_adapter(make_model("llama"), config)
