"""The paper's reference code's checkpoints (``loralib``) read into an adapter."""

from __future__ import annotations

import loralib
import pytest
import torch
from adapter_checks import ATOL, assert_unchanged, snapshot

import loralab
import loralab.files.adapter_dir
import loralab.files.peft_config
from conftest import make_model
from loralab import AdapterFileError, LoraFusedLinear, lora_layers


def test_import_loralib_merged_linear_on_gpt2_c_attn(tmp_path):
    gpt2 = make_model("gpt2")
    c_attn = gpt2.transformer.h[0].attn.c_attn
    in_features, out_features = c_attn.weight.shape  # Conv1D: (in, out)
    merged = loralib.MergedLinear(
        in_features,
        out_features,
        r=4,
        lora_alpha=32,
        enable_lora=[True, False, True],
        fan_in_fan_out=True,
        merge_weights=False,
    )
    # loralib with fan_in_fan_out stores the weight transposed, exactly like Conv1D.
    assert merged.weight.shape == c_attn.weight.shape
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        merged.weight.copy_(c_attn.weight)
        merged.bias.copy_(c_attn.bias)
        merged.lora_A.copy_(torch.randn(merged.lora_A.shape, generator=generator) * 0.1)
        merged.lora_B.copy_(torch.randn(merged.lora_B.shape, generator=generator) * 0.1)
    assert merged.lora_A.shape == (8, in_features) and merged.lora_B.shape == (64, 4)
    x = torch.randn(2, 5, in_features, generator=generator)
    with torch.no_grad():
        expected = merged(x)
        base = c_attn(x)

    state = {
        "transformer.h.0.attn.c_attn.lora_A": merged.lora_A.detach().clone(),
        "transformer.h.0.attn.c_attn.lora_B": merged.lora_B.detach().clone(),
    }
    path = tmp_path / "lora.pt"
    torch.save(state, path)
    loralab.import_loralib(gpt2, path, lora_alpha=32)

    layer = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraFusedLinear) and layer.parts.enabled == ("q", "v")
    assert set(lora_layers(gpt2)) == {"transformer.h.0.attn.c_attn"}
    with torch.no_grad():
        actual = layer(x)
    assert torch.equal(actual[..., 32:64], base[..., 32:64])  # k untouched
    diff = (actual - expected).abs().max().item()
    print(f"loralib MergedLinear: max |Δ| = {diff:.3g}")
    assert (expected - base).abs().max() > 0.1
    assert diff <= ATOL


def test_import_loralib_linear_on_llama_q_proj():
    llama = make_model("llama")
    q_proj = llama.model.layers[1].self_attn.q_proj
    linear = loralib.Linear(
        q_proj.in_features,
        q_proj.out_features,
        r=4,
        lora_alpha=16,
        bias=False,
        merge_weights=False,
    )
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        linear.weight.copy_(q_proj.weight)
        linear.lora_A.copy_(torch.randn(linear.lora_A.shape, generator=generator) * 0.1)
        linear.lora_B.copy_(torch.randn(linear.lora_B.shape, generator=generator) * 0.1)
    x = torch.randn(3, q_proj.in_features, generator=generator)
    with torch.no_grad():
        expected = linear(x)
        base = q_proj(x)
    state = {
        "model.layers.1.self_attn.q_proj.lora_A": linear.lora_A.detach(),
        "model.layers.1.self_attn.q_proj.lora_B": linear.lora_B.detach(),
    }
    loralab.import_loralib(llama, state, lora_alpha=16)
    assert set(lora_layers(llama)) == {"model.layers.1.self_attn.q_proj"}
    with torch.no_grad():
        actual = llama.model.layers[1].self_attn.q_proj(x)
    diff = (actual - expected).abs().max().item()
    print(f"loralib Linear: max |Δ| = {diff:.3g}")
    assert (expected - base).abs().max() > 0.1
    assert diff <= ATOL


def test_import_loralib_unknown_module_is_named_and_model_unchanged():
    llama = make_model("llama")
    before = snapshot(llama)
    state = {
        "model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 32),
        "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(32, 4),
        "model.layers.7.self_attn.q_proj.lora_A": torch.zeros(4, 32),
        "model.layers.7.self_attn.q_proj.lora_B": torch.zeros(32, 4),
    }
    with pytest.raises(
        AdapterFileError,
        match=r"'model\.layers\.7\.self_attn\.q_proj\.lora_A' names no module",
    ):
        loralab.import_loralib(llama, state, lora_alpha=8)
    assert_unchanged(llama, before)


def test_import_loralib_wrong_shape_is_named_and_model_unchanged():
    llama = make_model("llama")
    before = snapshot(llama)
    state = {
        "model.layers.0.self_attn.v_proj.lora_A": torch.zeros(4, 48),
        "model.layers.0.self_attn.v_proj.lora_B": torch.zeros(16, 4),
    }
    with pytest.raises(AdapterFileError, match=r"v_proj.*\(4, 48\).*do not fit.*\(4, 32\)"):
        loralab.import_loralib(llama, state, lora_alpha=8)
    assert_unchanged(llama, before)
