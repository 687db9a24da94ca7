"""Merging: W = W0 + ΔW gives the same outputs, back and forth, and a plain model."""

import pytest
import torch

import loralab
from conftest import make_model, randomize_lora, token_batch
from loralab import (
    LoraConfig,
    MergeError,
    adapter_state_dict,
    inject_adapter,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    merge_state_dicts,
    unload,
    unmerge_adapter,
)
from loralab.files.peft_config import peft_config_dict

CONFIGS = {
    "llama": LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", "up"]),
    "gpt2": LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "o", "down"]),
    "bert": LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v"], modules_to_save=["classifier"]
    ),
}


def _adapted(kind):
    model = make_model(kind)
    inject_adapter(model, CONFIGS[kind])
    randomize_lora(model)
    if kind == "bert":
        with torch.no_grad():
            model.classifier.copies["default"].weight.mul_(-2.0)
    return model


def _base_weights(model):
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}


def test_merged_equals_unmerged_and_merge_is_idempotent(model_kind):
    model = _adapted(model_kind)
    tokens = token_batch()
    unmerged = model(tokens).logits
    w0 = _base_weights(model)
    merge_adapter(model)
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)
    once = _base_weights(model)
    assert any(not torch.equal(once[n], w0[n]) for n in w0)
    merge_adapter(model)  # twice: nothing happens
    assert all(torch.equal(_base_weights(model)[n], once[n]) for n in once)
    unmerge_adapter(model)
    for name, weight in _base_weights(model).items():
        torch.testing.assert_close(weight, w0[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_gives_the_original_classes_and_keys(model_kind, tmp_path):
    model = _adapted(model_kind)
    tokens = token_batch()
    adapted = model(tokens).logits
    plain = make_model(model_kind)
    merged = merge_and_unload(model)
    assert type(merged) is type(plain)
    assert list(merged.state_dict()) == list(plain.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(tokens).logits, adapted, atol=1e-5, rtol=1e-5)
    # it saves and loads with plain Transformers
    merged.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(tokens).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unload_gives_back_the_base_exactly(model_kind):
    model = _adapted(model_kind)
    base = make_model(model_kind)
    merge_adapter(model)
    restored = unload(model)
    for name, value in base.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, atol=1e-6, rtol=1e-6)
    tokens = token_batch()
    torch.testing.assert_close(restored(tokens).logits, base(tokens).logits, atol=1e-5, rtol=1e-5)


def test_safe_merge_is_all_or_nothing():
    model = _adapted("llama")
    last = lora_layers(model)["model.layers.1.self_attn.o_proj"]
    with torch.no_grad():
        last.lora["default"].B[0, 0] = float("inf")
    w0 = _base_weights(model)
    with pytest.raises(MergeError, match=r"non-finite .*model\.layers\.1\.self_attn\.o_proj"):
        merge_adapter(model, safe=True)
    assert all(torch.equal(_base_weights(model)[n], w0[n]) for n in w0)
    assert not any(layer.merged_adapters for layer in lora_layers(model).values())


def test_tied_weights_are_not_merged_silently():
    model = make_model("gpt2")  # wte is tied to lm_head
    inject_adapter(model, LoraConfig(target_modules=["wte"]))
    randomize_lora(model)
    w0 = model.transformer.wte.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match=r"'transformer.wte'.*tied to \['lm_head.weight'\]"):
        merge_adapter(model)
    assert torch.equal(model.transformer.wte.base_layer.weight, w0)


def test_bf16_base_merges_close_to_its_unmerged_output():
    model = make_model("llama").to(torch.bfloat16)
    inject_adapter(model, CONFIGS["llama"])
    randomize_lora(model, std=0.05)
    assert all(
        layer.lora["default"].A.dtype == torch.float32 for layer in lora_layers(model).values()
    )
    tokens = token_batch()
    unmerged = model(tokens).logits.float()
    expected = {
        n: (layer.base_layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
        for n, layer in lora_layers(model).items()
    }
    merge_adapter(model)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, expected[name])  # fp32 sum, cast once
    merged = model(tokens).logits.float()
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_merge_state_dicts_refuses_a_tied_weight():
    base_state = make_model("gpt2").state_dict()  # wte and lm_head share one storage
    model = make_model("gpt2")
    inject_adapter(model, LoraConfig(target_modules=["wte"]))
    randomize_lora(model)
    with pytest.raises(MergeError, match=r"'transformer.wte.weight'.*tied to \['lm_head.weight'\]"):
        merge_state_dicts(base_state, adapter_state_dict(model), peft_config_dict(model))


def test_merging_an_unknown_adapter_lists_the_loaded_ones():
    model = _adapted("llama")
    with pytest.raises(KeyError, match=r"no adapter named 'other'; the model has \['default'\]"):
        merge_adapter(model, "other")


def test_merge_state_dicts_refuses_a_delta_in_the_wrong_layout():
    """GPT-2's Conv1D weights are (in, out): a config without fan_in_fan_out gives ΔW the
    other way round, which must not be folded in as if it fit."""
    model = make_model("gpt2")
    loralab.inject_adapter(model, loralab.LoraConfig(r=2, target_modules=["c_fc"]))
    tensors = {k: v for k, v in loralab.adapter_state_dict(model).items()}
    config = {**peft_config_dict(model), "fan_in_fan_out": False}
    with pytest.raises(ValueError, match=r"give ΔW of shape \(128, 32\) but base weight"):
        loralab.merge_state_dicts(make_model("gpt2").state_dict(), tensors, config)
