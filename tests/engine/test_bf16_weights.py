"""The engine's bf16 weights (``engine/weights.py``): the fast step with each group's base
weights fused and copied to bf16 computes what the fp32 modules compute on the same
rounded numbers (weights, the products' inputs and outputs rounded to bf16; the norms,
attention and LoRA updates in fp32), each row its own adapter as in fp32; the choice
follows the CPU and a bf16 that would be emulated is refused with the reason; a changed
base weight is copied again."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fast_step import _hidden, _two_adapters
from test_llama_engine import FAMILY, _model

from loralab.engine import plan, weights
from loralab.lora.layers import LoraLayer
from loralab.lora.mixing import mixed_adapters


@pytest.fixture(autouse=True)
def _native_bf16(monkeypatch):
    """Every CPU computes bf16 (emulated where it lacks the instructions): the tests
    check the numbers, so they run wherever CI runs."""
    monkeypatch.setattr(weights, "_native_bf16", lambda device: "the test says so")


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def with_copied_weights(model: torch.nn.Module, copy_of) -> torch.nn.Module:
    """A copy whose base products see what the engine's copied weights do: each base
    weight replaced by ``copy_of(weight)`` (in fp32), the products' inputs and outputs
    rounded to bf16, the bias added after; computed by the model's own modules."""
    model = copy.deepcopy(model)
    bases = [model.lm_head]
    for layer in model.model.layers:
        for name in (*plan.ATTENTION, *plan.MLP):
            module = getattr(layer.self_attn if name in plan.ATTENTION else layer.mlp, name)
            bases.append(module.base_layer if isinstance(module, LoraLayer) else module)
    with torch.no_grad():
        for base in bases:
            base.weight.data = copy_of(base.weight)  # untied from the embeddings
            bias, base.bias = base.bias, None  # added after the rounding, as the engine does
            base.register_forward_pre_hook(lambda m, args: (bf16(args[0]),))
            base.register_forward_hook(
                lambda m, args, out, bias=bias: bf16(out) + (0 if bias is None else bias)
            )
    return model


def _rounded_like_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """What bf16 weights compute: the weights, too, rounded to bf16."""
    return with_copied_weights(model, bf16)


def _logits(model, weights_format: str, fast: bool, row_adapters=None) -> torch.Tensor:
    return _hidden(model, fast, row_adapters, weights_format, logits=True)


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_bf16_weights_compute_the_rounded_products(name, adapter):
    model = _model(name, adapter)
    ours = _logits(model, "bf16", fast=True)
    rounded = _logits(_rounded_like_bf16(model), "fp32", fast=False)
    exact = _logits(model, "fp32", fast=True)
    near, far = (ours - rounded).abs().max().item(), (ours - exact).abs().max().item()
    print(f"{name}, {'adapter' if adapter else 'base'}: max |Δlogit| {near:.1e} to the "
          f"rounded modules, {far:.1e} to fp32")  # fmt: skip
    # The same rounded numbers, but for a rare sum that lands on the other side of a bf16
    # rounding where the CPU's kernels sum in another order (none on an AMX Xeon; 1.3% of
    # Qwen2-with-adapter's logits on an AVX2 EPYC, 1e-3 off, the mean 70× below fp32's).
    gap = (ours - rounded).abs()
    assert (gap > 1e-4).float().mean() < 0.05
    assert gap.mean() < (ours - exact).abs().mean() / 20
    assert far > 5e-4  # the rounding is in effect: fp32 is farther than the rounding


def test_withoutonednn_bf16_the_copies_stay_unpacked_with_the_same_numbers(monkeypatch):
    """Where oneDNN does not multiply bf16 (a CPU without AVX-512, or one the test says
    is such), the copies stay unpacked and ``F.linear`` computes the same rounded
    numbers (up to a rare sum on the other side of a rounding, as above)."""
    monkeypatch.setattr(weights, "onednn_bf16", lambda: False)
    model = _model("qwen2", adapter=True)  # biases too
    assert plan.build(model, weights="bf16")[0].qkv.packed.onednn is False
    ours = _logits(model, "bf16", fast=True)
    rounded = _logits(_rounded_like_bf16(model), "fp32", fast=False)
    exact = _logits(model, "fp32", fast=True)
    gap = (ours - rounded).abs()
    assert (gap > 1e-4).float().mean() < 0.05
    assert gap.mean() < (ours - exact).abs().mean() / 20


def each_row_its_adapter(weights_format: str, like, atol: float) -> None:
    """Rows of adapters a, none and b on ``weights_format`` weights compute what the
    modules of ``like(model)`` (the same rounded numbers in fp32) compute under
    ``mixed_adapters``, and each row's numbers are its own."""
    model = _two_adapters()
    rows = ["a", None, "b"]
    ours = _logits(model, weights_format, fast=True, row_adapters=rows)
    reference = like(model)
    with mixed_adapters(reference, rows):
        expected = _logits(reference, "fp32", fast=False)
    torch.testing.assert_close(ours, expected, rtol=0, atol=atol)
    alone = _logits(model, weights_format, fast=True, row_adapters=["b", "b", "b"])
    assert (ours[2] - alone[2]).abs().max() == 0  # a row's numbers are its own
    assert (ours[0] - alone[0]).abs().max() > 0.1


def test_bf16_weights_give_each_row_its_adapter():
    each_row_its_adapter("bf16", _rounded_like_bf16, atol=1e-4)


def test_a_changed_base_weight_is_copied_again():
    model = _model("llama", adapter=True)
    before = plan.build(model, weights="bf16")[0].qkv.packed
    assert plan.build(model, weights="bf16")[0].qkv.packed is before  # made once
    with torch.no_grad():  # a merge writes into the base weight in place
        model.model.layers[0].self_attn.k_proj.base_layer.weight.add_(1.0)
    assert plan.build(model, weights="bf16")[0].qkv.packed is not before


def test_the_format_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert weights.choose("auto", cpu) == ("bf16", "the test says so")
    assert weights.choose("fp32", cpu)[0] == "fp32"
    monkeypatch.setattr(weights, "_native_bf16", lambda device: None)
    assert weights.choose("auto", cpu) == (
        "fp32", "this CPU has neither AVX512-BF16 nor AMX (bf16 would be slower)"
    )  # fmt: skip
    with pytest.raises(ValueError, match="neither AVX512-BF16 nor AMX"):
        weights.choose("bf16", cpu)
    with pytest.raises(ValueError, match="must be one of fp32, bf16, int8, auto, not 'int4'"):
        weights.choose("int4", cpu)
