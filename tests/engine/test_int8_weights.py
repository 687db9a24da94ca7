"""The engine's int8 weights (``--engine-weights int8``, ``engine/weights.py``): each
group's base weights and the head copied to int8 with one scale per output row, their
products' inputs in bf16; the fast step then computes what the fp32 modules compute on
those dequantized weights (inputs and outputs rounded to bf16), each row its own adapter."""

from __future__ import annotations

import pytest
import torch
from test_bf16_weights import each_row_its_adapter, with_copied_weights
from test_fast_step import _hidden
from test_llama_engine import FAMILY, _model

from loralab.engine import plan, weights


def _dequantized_like_int8(model: torch.nn.Module) -> torch.nn.Module:
    """What int8 weights compute: each weight its int8 values times its rows' scales
    (exact in fp32: 8 bits times 8)."""

    def dequantized(weight: torch.Tensor) -> torch.Tensor:
        values, scales = weights.quantized(weight)
        return values.float() * scales.float()[:, None]

    return with_copied_weights(model, dequantized)


def _logits(model, weights_format: str, fast: bool, row_adapters=None) -> torch.Tensor:
    return _hidden(model, fast, row_adapters, weights_format, logits=True)


def test_a_weight_becomes_int8_and_a_scale_per_row():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=generator) * torch.logspace(-3, 1, 48)[:, None]
    weight[5] = 0  # a row of zeros keeps a usable scale
    values, scales = weights.quantized(weight)
    assert values.dtype == torch.int8 and scales.dtype == torch.bfloat16
    assert values.abs().amax(dim=1)[torch.arange(48) != 5].min() >= 126  # each row's range used
    assert values[5].abs().max() == 0
    back = values.float() * scales.float()[:, None]
    assert ((back - weight).abs() <= scales.float()[:, None] * 0.51).all()  # half a step


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_int8_weights_compute_the_dequantized_products(name, adapter):
    model = _model(name, adapter)
    ours = _logits(model, "int8", fast=True)
    dequantized = _logits(_dequantized_like_int8(model), "fp32", fast=False)
    exact = _logits(model, "fp32", fast=True)
    gap, far = (ours - dequantized).abs(), (ours - exact).abs()
    print(f"{name}, {'adapter' if adapter else 'base'}: max |Δlogit| {gap.max():.1e} to the "
          f"dequantized modules, {far.max():.1e} to fp32")  # fmt: skip
    # The same numbers but for sums that land on the other side of a bf16 rounding (the
    # kernel multiplies by the scale after summing; the modules, before)
    assert (gap > 1e-3).float().mean() < 0.05
    assert gap.mean() < far.mean() / 10
    assert far.max() > 1e-3  # the rounding is in effect


def test_int8_weights_give_each_row_its_adapter():
    each_row_its_adapter("int8", _dequantized_like_int8, atol=2e-3)


def test_int8_is_asked_for_never_chosen(monkeypatch):
    cpu = torch.device("cpu")
    assert weights.choose("int8", cpu)[0] == "int8"
    for native in ("the test says so", None):  # with bf16 units or without
        monkeypatch.setattr(weights, "_native_bf16", lambda device, native=native: native)
        assert weights.choose("auto", cpu)[0] != "int8"
    with pytest.raises(ValueError, match="int8 run on the CPU"):
        weights.choose("int8", torch.device("cuda"))
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    with pytest.raises(ValueError, match="no weight-only int8 kernel"):
        weights.choose("int8", cpu)


def test_the_int8_copy_is_made_again_when_the_weight_changes():
    model = _model("llama", adapter=True)
    before = plan.build(model, weights="int8")[0].gate_up.packed
    assert before.format == "int8"
    assert plan.build(model, weights="int8")[0].gate_up.packed is before
    assert plan.build(model, weights="bf16")[0].gate_up.packed.format == "bf16"  # per format
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    assert plan.build(model, weights="int8")[0].gate_up.packed is not before


@pytest.mark.parametrize("rows", [1, 4, weights.INT8_KERNEL_ROWS, 40])
def test_a_product_by_int8_weights_at_any_row_count(rows):
    """A step's few rows run the int8 kernel, a prompt's many the dequantized weights in
    fp32: both give the dequantized product of the bf16-rounded inputs, rounded to bf16."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(64, 48, generator=generator)
    values, scales = weights.quantized(weight)
    packed = weights.Packed(values, None, False, scales)
    x = torch.randn(rows, 48, generator=generator)
    expected = (x.bfloat16().float() @ (values.float() * scales.float()[:, None]).T).bfloat16()
    torch.testing.assert_close(weights.linear(x, packed), expected.float(), rtol=8e-3, atol=1e-3)
