"""A base quantized by bitsandbytes (QLoRA's NF4 and FP4, LLM.int8()) as a frozen base: LoRA
over it computes what LoRA over a dense layer holding the unpacked weight does, no dense
weight is kept for the backward, the quantized bytes never change, bitsandbytes' in-place
CPU rewrite is kept from breaking training, and merging writes a dense model (or, when
asked, a re-quantized one, with a warning that says how much of ΔW the rounding lost)."""

from __future__ import annotations

import bitsandbytes
import pytest
import torch
from torch import nn

from conftest import (
    adamw_steps,
    load_tiny_causal_lm,
    randomize_lora,
    saved_for_backward,
    token_batch,
)
from loralab import LoraConfig, MergeError, inject_adapter, merge_adapter, trainable_parameters
from loralab.lora import frozen_base
from loralab.lora.merge import QuantizationLossWarning, merge_and_unload
from loralab.lora.quantized import bnb
from loralab.models.loading import load_model

FORMATS = ("nf4", "fp4", "int8")
CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def _quantized(tiny_model_dir, format_name: str, adapter: bool = True):
    model, _ = load_model(str(tiny_model_dir), quantized_base=format_name)
    if adapter:
        inject_adapter(model, CONFIG)
        randomize_lora(model, seed=5)
    return model.train()


def _bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if bnb.is_quantized_layer(m)}


def _dense_twin(tiny_model_dir, quantized: nn.Module) -> nn.Module:
    """The tiny model with every quantized weight replaced by its unpacked values, and the
    same adapter."""
    dense, _ = load_tiny_causal_lm(tiny_model_dir)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in _bnb_layers(quantized).items():
            modules[name.replace(".base_layer", "")].weight.copy_(bnb.dequantized(layer))
    inject_adapter(dense, CONFIG)
    randomize_lora(dense, seed=5)
    return dense.train()


@pytest.mark.parametrize("format_name", FORMATS)
def test_every_linear_but_the_head_is_quantized_and_read_by_its_kind(tiny_model_dir, format_name):
    model = _quantized(tiny_model_dir, format_name, adapter=False)
    layers = _bnb_layers(model)
    assert len(layers) == 14 and isinstance(model.lm_head, nn.Linear)
    for layer in layers.values():
        assert type(frozen_base.kind_of(layer)).__name__ == "BitsAndBytesBase"
        assert bnb.format_name(layer) == format_name
        assert frozen_base.weight_shape(layer) == (layer.out_features, layer.in_features)
        assert frozen_base.weight_matrix(layer).shape == (layer.out_features, layer.in_features)
        assert frozen_base.fixed_reason(layer).startswith("its weight is quantized by bitsandbytes")
        if bnb.is_4bit(layer):
            assert layer.support_avx512bf16_for_cpu is False  # the loader's guard
            assert layer.weight.quant_state.blocksize == 64 and layer.weight.quant_state.nested
    report = trainable_parameters(inject_adapter(model, CONFIG))
    assert report.packed_bytes == sum(map(_stored_bytes, layers.values()))


def _stored_bytes(layer: nn.Module) -> int:
    """What a layer's weight takes in its format: int8, a byte a value and an fp32 scale a
    row; NF4/FP4, half a byte a value, a byte a block of 64 (the scale, quantized again)
    and an fp32 scale per 256 blocks."""
    values = layer.out_features * layer.in_features
    if bnb.is_8bit(layer):
        return values + 4 * layer.out_features
    blocks = -(-values // 64)
    return values // 2 + blocks + 4 * -(-blocks // 256)


@pytest.mark.parametrize("format_name", FORMATS)
def test_lora_over_it_gives_the_dense_twins_loss_and_gradients(tiny_model_dir, format_name):
    quantized = _quantized(tiny_model_dir, format_name)
    dense = _dense_twin(tiny_model_dir, quantized)
    tokens = token_batch()
    ours, twin = quantized(tokens, labels=tokens).loss, dense(tokens, labels=tokens).loss
    ours.backward()
    twin.backward()
    print(f"{format_name}: loss {ours.item():.6f} against the dense twin's {twin.item():.6f}")
    torch.testing.assert_close(ours, twin, rtol=1e-6, atol=1e-6)
    twin_grads = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert grads.keys() == twin_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(grad, twin_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("format_name", ["nf4", "fp4"])
def test_no_dense_weight_is_saved_for_the_backward(tiny_model_dir, format_name):
    model = _quantized(tiny_model_dir, format_name)
    shapes = {(m.out_features, m.in_features) for m in _bnb_layers(model).values()}
    saved = saved_for_backward(model, token_batch())
    weights = [s for s in saved if s[0].is_floating_point and s[1] in shapes]
    assert not weights, weights


@pytest.mark.parametrize("format_name", FORMATS)
def test_training_never_changes_the_quantized_bytes(tiny_model_dir, format_name):
    model = _quantized(tiny_model_dir, format_name)
    before = {n: bnb.dequantized(m) for n, m in _bnb_layers(model).items()}
    raw = {n: m.weight.data.clone() for n, m in _bnb_layers(model).items()}
    adamw_steps(model)
    for name, layer in _bnb_layers(model).items():
        assert torch.equal(layer.weight.data, raw[name]), name
        assert torch.equal(bnb.dequantized(layer), before[name]), name


def _steps(model: nn.Module, evaluate: bool) -> list[dict[str, torch.Tensor]]:
    """Three training steps' gradients; with ``evaluate``, an eval-mode forward without
    gradients and a short greedy generation before each step, as a run that evaluates
    and samples as it trains does."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = token_batch()
    grads = []
    for _ in range(3):
        if evaluate:
            model.eval()
            with torch.no_grad():
                model(tokens)
                model.generate(tokens[:1, :3], max_new_tokens=3, do_sample=False)
            model.train()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
    return grads


@pytest.mark.parametrize("format_name", ["nf4", "fp4"])
def test_evaluating_and_generating_between_steps_leaves_the_gradients_as_they_were(
    tiny_model_dir, format_name
):
    """bitsandbytes rewrites a 4-bit weight on an eval forward without gradients on a CPU
    with AVX512-BF16 (bitsandbytes#2078), after which the input's gradient is lost: a run
    that evaluates must train exactly as one that never did."""
    never = _steps(_quantized(tiny_model_dir, format_name), evaluate=False)
    model = _quantized(tiny_model_dir, format_name)
    alternated = _steps(model, evaluate=True)
    assert not any(map(bnb.is_rewritten, _bnb_layers(model).values()))
    for step, (theirs, ours) in enumerate(zip(never, alternated, strict=True)):
        for name, grad in theirs.items():
            assert torch.equal(ours[name], grad), (step, name)


def test_a_weight_bitsandbytes_rewrote_already_is_refused_with_the_reason(tiny_model_dir):
    """A model quantized outside loralab and run in eval mode before the adapter is added:
    its rewritten 4-bit weights cannot be put back, so adding an adapter is refused."""
    model = _quantized(tiny_model_dir, "nf4", adapter=False)
    layer = model.model.layers[0].mlp.down_proj
    functional = bitsandbytes.functional
    layer.weight.data, layer.weight.quant_state = functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert bnb.is_rewritten(layer)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: .*bitsandbytes#2078"):
        inject_adapter(model, CONFIG)


@pytest.mark.skipif(
    not bitsandbytes.functional.has_avx512bf16(), reason="bitsandbytes rewrites only here"
)
@pytest.mark.filterwarnings("ignore:bitsandbytes::gemv_4bit")  # its own word for the bug
def test_without_the_guard_the_alternated_run_trains_differently(tiny_model_dir):
    """What the guard prevents, where bitsandbytes does it (a CPU with AVX512-BF16): the
    test above fails without it. Its CPU layout takes rows of whole blocks of 64, so the
    guard is lifted on the MLP's down projections (64 inputs) alone."""
    never = _steps(_quantized(tiny_model_dir, "nf4"), evaluate=False)
    model = _quantized(tiny_model_dir, "nf4")
    unguarded = [m for m in _bnb_layers(model).values() if m.in_features % 64 == 0]
    for layer in unguarded:
        layer.support_avx512bf16_for_cpu = True
    alternated = _steps(model, evaluate=True)
    assert len(unguarded) == 2 and all(map(bnb.is_rewritten, unguarded))
    assert any(
        not torch.equal(ours[name], grad)
        for theirs, ours in zip(never, alternated, strict=True)
        for name, grad in theirs.items()
    )


@pytest.mark.parametrize("format_name", FORMATS)
def test_merging_writes_a_dense_model_with_the_adapters_logits(tiny_model_dir, format_name):
    model = _quantized(tiny_model_dir, format_name)
    tokens = token_batch()
    with torch.no_grad():
        expected = model(tokens).logits
    merged = merge_and_unload(model)
    assert not _bnb_layers(merged)
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = merged(tokens).logits
    gap = (logits - expected).abs().max().item()
    print(f"{format_name}: merged into the unpacked weights, max |Δlogits| {gap:.1e}")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("format_name", FORMATS)
def test_requantizing_the_merge_is_explicit_and_warns_how_much_was_lost(
    tiny_model_dir, format_name
):
    model = _quantized(tiny_model_dir, format_name)
    with pytest.warns(QuantizationLossWarning, match=r"re-quantized 14 merged weights") as said:
        merged = merge_and_unload(model, requantize=True)
    layers = _bnb_layers(merged)
    assert len(layers) == 14 and all(bnb.format_name(m) == format_name for m in layers.values())
    print(f"{format_name}: {said[0].message}")


def test_merging_in_place_is_refused_with_nothing_changed(tiny_model_dir):
    model = _quantized(tiny_model_dir, "nf4")
    before = {n: m.weight.data.clone() for n, m in _bnb_layers(model).items()}
    with pytest.raises(MergeError, match=r"quantized by bitsandbytes \(nf4\)"):
        merge_adapter(model)
    assert all(torch.equal(m.weight.data, before[n]) for n, m in _bnb_layers(model).items())
