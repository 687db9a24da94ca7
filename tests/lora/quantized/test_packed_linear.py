"""A packed frozen base: it computes what a dense layer holding the unpacked weight does
(output, and the gradients of the input and of LoRA's factors), keeps only its packed
bytes for the backward, never changes them, and LoRA and its variants work over it or
refuse with the reason."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from conftest import adamw_steps, make_model, randomize_lora, saved_for_backward, token_batch
from loralab import LoraConfig, MergeError, TargetError, inject_adapter, merge_adapter
from loralab.lora import frozen_base
from loralab.lora.merge import QuantizationLossWarning, merge_and_unload
from loralab.lora.quantized import PackedLinear, format_named
from loralab.lora.quantized.packed_linear import packed_from
from loralab.models.packed_gguf import pack_linears


def _packed(out: int = 24, columns: int = 64, name: str = "Q4_1", seed: int = 0) -> PackedLinear:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((out, columns)).astype(np.float32)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType[name])
    bias = torch.from_numpy(rng.standard_normal(out).astype(np.float32))
    return PackedLinear(torch.from_numpy(raw), format_named(name), columns, out, bias)


def _dense_twin(packed: PackedLinear) -> nn.Linear:
    dense = nn.Linear(packed.in_features, packed.out_features)
    with torch.no_grad():
        dense.weight.copy_(packed.dequantized())
        dense.bias.copy_(packed.bias)
    return dense.requires_grad_(False)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_output_and_input_gradient_equal_a_dense_layer_of_the_unpacked_weight(name):
    _assert_computes_as_its_dense_twin(_packed(name=name), 64)


def _assert_computes_as_its_dense_twin(
    packed: PackedLinear, columns: int, exact: bool = True
) -> None:
    """The same output and input gradient as ``nn.Linear`` holding the unpacked weight,
    to the last bit (``exact``), or to fp32 rounding where the weight is unpacked by parts:
    the CPU's kernels may sum a product of 8 output rows in another order than one of 96
    (equal bits on an AVX-512 Xeon, not on an AVX2 EPYC)."""
    dense = _dense_twin(packed)
    x = torch.randn(3, 5, columns, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y, y_dense = packed(x), dense(x_dense)
    same = torch.equal if exact else _close
    assert same(y, y_dense)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_dense.backward(grad)
    assert same(x.grad, x_dense.grad)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # sums of 256 terms of ~±30
    return True


def test_gradcheck_in_float64():
    packed = _packed()
    packed.dtype = torch.float64
    packed.bias = None
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(packed, (x,))


def _lora_pair(seed: int = 0):
    """The tiny Llama with its linear weights packed as Q4_1, and a dense twin holding the
    unpacked weights, each with the same LoRA adapter."""
    packed_model = make_model("llama", seed)
    assert pack_linears(packed_model, "Q4_1") == 15  # the untied head too
    dense_model = make_model("llama", seed)
    dense_modules = dict(dense_model.named_modules())
    with torch.no_grad():
        for name, module in packed_model.named_modules():
            if isinstance(module, PackedLinear):
                dense_modules[name].weight.copy_(module.dequantized())
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    for model in (packed_model, dense_model):
        inject_adapter(model, config)
        randomize_lora(model, seed=5)
    dense = dict(dense_model.named_parameters())
    for name, parameter in packed_model.named_parameters():  # the factors, norms, embedding
        assert torch.equal(parameter, dense[name])
    return packed_model, dense_model


def test_lora_over_a_packed_base_gives_the_dense_outputs_and_factor_gradients():
    packed_model, dense_model = _lora_pair()
    tokens = token_batch()
    packed_loss = packed_model(tokens, labels=tokens).loss
    dense_loss = dense_model(tokens, labels=tokens).loss
    assert torch.equal(packed_loss, dense_loss)
    packed_loss.backward()
    dense_loss.backward()
    dense_grads = {n: p.grad for n, p in dense_model.named_parameters() if p.requires_grad}
    trained = {n: p for n, p in packed_model.named_parameters() if p.requires_grad}
    assert trained.keys() == dense_grads.keys() and len(trained) == 28
    for name, parameter in trained.items():
        torch.testing.assert_close(parameter.grad, dense_grads[name], rtol=1e-5, atol=1e-7)


def test_no_dense_weight_is_saved_for_the_backward():
    packed_model, _ = _lora_pair()
    shapes = {
        (m.out_features, m.in_features)
        for m in packed_model.modules()
        if isinstance(m, PackedLinear)
    }
    saved = saved_for_backward(packed_model, token_batch())
    weights = [s for s in saved if s[0].is_floating_point and s[1] in shapes]
    assert not weights, weights
    assert any(dtype == torch.uint8 for dtype, _ in saved)  # the packed bytes, instead


def test_training_never_changes_the_packed_bytes():
    packed_model, _ = _lora_pair()
    before = {n: b.clone() for n, b in packed_model.named_buffers() if n.endswith("packed")}
    adamw_steps(packed_model)
    after = dict(packed_model.named_buffers())
    assert len(before) == 15
    assert all(torch.equal(after[n], b) for n, b in before.items())


def test_the_kind_of_a_packed_base():
    packed = _packed(out=24, columns=64)
    assert frozen_base.in_out(packed) == (64, 24)
    assert frozen_base.weight_shape(packed) == (24, 64)
    assert torch.equal(frozen_base.weight_matrix(packed), packed.dequantized())
    assert frozen_base.compute_dtype(packed) == torch.float32
    assert "packed (Q4_1 blocks)" in frozen_base.fixed_reason(packed)
    assert not list(packed.state_dict())[:-1]  # only the bias: the bytes are not saved


def test_merging_into_a_packed_base_is_refused_with_nothing_changed():
    packed_model, _ = _lora_pair()
    before = {n: t.clone() for n, t in packed_model.state_dict().items()}
    with pytest.raises(MergeError, match=r"weight is packed \(Q4_1 blocks\).*loralab merge"):
        merge_adapter(packed_model)
    assert all(torch.equal(before[n], t) for n, t in packed_model.state_dict().items())


def test_merge_and_unload_writes_the_dense_twins_merged_model():
    packed_model, dense_model = _lora_pair()
    tokens = token_batch()
    with torch.no_grad():
        expected = packed_model(tokens).logits
        merged = merge_and_unload(packed_model)
        twin = merge_and_unload(dense_model)
        assert not any(isinstance(m, PackedLinear) for m in merged.modules())
        assert merged.state_dict().keys() == twin.state_dict().keys()
        for name, tensor in merged.state_dict().items():
            assert torch.equal(tensor, twin.state_dict()[name]), name
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=0, atol=1e-5)


def test_requantizing_the_merge_packs_it_again_and_warns():
    packed_model, _ = _lora_pair()
    with pytest.warns(QuantizationLossWarning, match=r"re-quantized 14 merged weights"):
        merged = merge_and_unload(packed_model, requantize=True)
    packed = [m for m in merged.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 15 and {m.block_format.name for m in packed} == {"Q4_1"}  # + the head


def test_requantizing_into_a_format_the_gguf_package_cannot_write_is_refused():
    dense = nn.Linear(256, 4)
    with pytest.raises(ValueError, match="cannot quantize into Q4_K; only Q4_0, Q4_1 and Q8_0"):
        packed_from(dense, format_named("Q4_K"))


def test_an_init_that_rewrites_the_base_is_refused_on_a_packed_one():
    model = make_model("llama")
    pack_linears(model, "Q4_1")
    with pytest.raises(TargetError, match=r"init='pissa' .*rewrites W0, but its weight is packed"):
        inject_adapter(model, LoraConfig(r=2, target_modules=["q"], init="pissa"))


def test_dora_over_a_packed_base_equals_dora_over_the_dense_twin():
    packed_model = make_model("llama")
    pack_linears(packed_model, "Q8_0")
    dense_model = make_model("llama")
    dense_modules = dict(dense_model.named_modules())
    with torch.no_grad():
        for name, module in packed_model.named_modules():
            if isinstance(module, PackedLinear):
                dense_modules[name].weight.copy_(module.dequantized())
    config = LoraConfig(r=2, target_modules=["q", "v"], use_dora=True)
    outputs = []
    for model in (packed_model, dense_model):
        inject_adapter(model, config)
        randomize_lora(model, seed=3)
        outputs.append(model(token_batch()).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0"])
def test_a_large_weight_unpacked_by_parts_gives_the_whole_products_numbers(monkeypatch, name):
    from loralab.lora.quantized import packed_linear

    monkeypatch.setattr(packed_linear, "PART_VALUES", 2048)  # 8 rows, 32 columns a part
    _assert_computes_as_its_dense_twin(_packed(out=96, columns=256, name=name), 256, exact=False)
