"""The inits registry, and what the layers do for an init that rewrites the base weight:
take its starting ΔW out of W0, give W0 back, save an adapter for the original base, and
refuse what would be wrong with a rewritten base (mixing, combining, hot-swapping)."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import loralab
from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, TargetError
from loralab.lora import frozen_base
from loralab.lora.inits import INITS, Init, get_init, init_of_peft, register_init
from loralab.lora.inject import lora_layers
from loralab.lora.layers import LoraLinear


class FirstColumns(Init):
    """A test init that starts at ΔW ≠ 0, from W0 alone (so a reload repeats it): B A is W0's
    first r columns, A their selection, B the columns over the scale."""

    name = "first-columns"
    rewrites_base = True

    def refusal(self, layer):
        return None if type(layer) is LoraLinear else "a test init for Linear layers"

    def start(self, layer, factors):
        r = factors.A.shape[0]
        weight = frozen_base.weight_matrix(layer.base_layer).float()
        factors.A.copy_(torch.eye(r, weight.shape[1]))
        factors.B.copy_(weight[:, :r] / factors.scale)


@pytest.fixture
def first_columns():
    register_init(FirstColumns)
    yield
    INITS.pop(FirstColumns.name)


def test_the_random_inits_are_registered_with_their_peft_values():
    assert get_init("kaiming").peft_value() is True and not get_init("kaiming").rewrites_base
    assert get_init("gaussian").peft_value() == "gaussian"
    assert init_of_peft(True) == "kaiming" and init_of_peft("gaussian") == "gaussian"
    with pytest.raises(ValueError, match="init must be one of 'kaiming', 'gaussian'"):
        get_init("loftq")


def _adapted(targets=("q_proj", "v_proj"), **options):
    model = make_model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **options)
    loralab.inject_adapter(model, config)
    return model


def test_a_rewriting_init_leaves_the_model_computing_what_it_did(first_columns):
    tokens = token_batch()
    with torch.no_grad():
        base = make_model("llama")(tokens).logits
        model = _adapted(init="first-columns")
        torch.testing.assert_close(model(tokens).logits, base, atol=1e-5, rtol=0)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.base_layer.weight[:, :4].abs().max() < 1e-6  # taken out of W0


def test_unload_and_delete_give_the_original_weights_back(first_columns):
    original = make_model("llama").state_dict()
    for remove in (loralab.unload, lambda m: loralab.delete_adapter(m, "default")):
        model = _adapted(init="first-columns")
        randomize_lora(model)  # trained
        remove(model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_saved_for_the_original_base_as_a_plain_lora_of_rank_2r(first_columns, tmp_path):
    tokens = token_batch()
    model = _adapted(init="first-columns")
    randomize_lora(model)
    with torch.no_grad():
        trained = model.eval()(tokens).logits
    loralab.save_adapter(model, tmp_path / "converted")
    written = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 16, True)
    for load in (
        lambda d: loralab.load_adapter(make_model("llama"), d),
        lambda d: peft.PeftModel.from_pretrained(make_model("llama"), d),
    ):
        with torch.no_grad():
            logits = load(tmp_path / "converted").eval()(tokens).logits
        torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)


def test_saved_as_trained_the_init_runs_again_on_load(first_columns, tmp_path):
    tokens = token_batch()
    model = _adapted(init="first-columns")
    randomize_lora(model)
    with torch.no_grad():
        trained = model.eval()(tokens).logits
    loralab.save_adapter(model, tmp_path, original_base=False)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["init_lora_weights"]) == (4, "first-columns")
    loaded = loralab.load_adapter(make_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens).logits, trained, atol=1e-5, rtol=0)


def test_merge_and_unload_keep_the_trained_weights(first_columns):
    tokens = token_batch()
    model = _adapted(init="first-columns")
    randomize_lora(model)
    with torch.no_grad():
        trained = model.eval()(tokens).logits
        merged = loralab.merge_and_unload(model)
        torch.testing.assert_close(merged(tokens).logits, trained, atol=1e-5, rtol=0)


def test_what_a_rewritten_base_cannot_do_is_refused_with_the_reason(first_columns, tmp_path):
    model = _adapted(init="first-columns")
    loralab.save_adapter(_adapted(), tmp_path / "plain")
    mixing = loralab.mixed_adapters(model, ["default", None])
    with pytest.raises(ValueError, match="its init rewrote the base weight"):
        mixing.__enter__()
    with pytest.raises(loralab.AdapterFileError, match="its init rewrote the base"):
        loralab.hot_swap_adapter(model, tmp_path / "plain", "default")
    loralab.load_adapter(model, tmp_path / "plain", adapter_name="plain")
    with pytest.raises(ValueError, match="cannot be combined: its init rewrote"):
        loralab.combine_adapters(model, ["default", "plain"], [1.0, 1.0], "both")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError, match="already holds the adapters"):
        loralab.inject_adapter(model, LoraConfig(r=2, init="first-columns"), "second")
    with pytest.raises(TargetError, match="a test init for Linear layers"):
        loralab.inject_adapter(
            make_model("llama"), LoraConfig(r=2, init="first-columns", use_dora=True)
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
