"""The LoRA layers compute h = W0 x + (α/r) B A x, and ΔW is one function of A and B."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab import FusedParts, LoraConv1D, LoraConv2d, LoraEmbedding, LoraFusedLinear, LoraLinear
from loralab.lora.layers import MergeError

R, ALPHA = 4, 12.0
SCALE = ALPHA / R


def _with_adapter(layer, dropout=0.0, init="kaiming", randomize=True):
    layer.add_adapter("default", R, ALPHA, SCALE, dropout, init)
    if randomize:
        with torch.no_grad():
            layer.lora["default"].B.normal_()
    return layer


def _factors(layer):
    f = layer.lora["default"]
    return f.A.detach(), f.B.detach()


def test_linear_forward_is_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = _with_adapter(LoraLinear(base))
    x = torch.randn(3, 5, 10)
    A, B = _factors(layer)
    expected = x @ base.weight.T + base.bias + SCALE * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), SCALE * B @ A)


def test_conv1d_forward_and_transposed_delta():
    torch.manual_seed(0)
    base = Conv1D(6, 10)  # GPT-2 stores the weight as (in, out) = (10, 6)
    layer = _with_adapter(LoraConv1D(base))
    x = torch.randn(2, 3, 10)
    A, B = _factors(layer)
    expected = x @ base.weight + base.bias + SCALE * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.delta_weight().shape == base.weight.shape == (10, 6)
    torch.testing.assert_close(layer.delta_weight(), (SCALE * B @ A).T)


def test_embedding_forward_and_delta():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = _with_adapter(LoraEmbedding(base))
    ids = torch.tensor([[0, 3, 19], [7, 7, 1]])
    A, B = _factors(layer)
    expected = base.weight[ids] + SCALE * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected)
    assert layer.delta_weight().shape == (20, 6)
    torch.testing.assert_close(layer.delta_weight(), (SCALE * B @ A).T)


def test_conv2d_forward_equals_convolution_with_merged_weight():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    layer = _with_adapter(LoraConv2d(base))
    x = torch.randn(2, 3, 9, 9)
    merged_weight = base.weight + layer.delta_weight()
    expected = nn.functional.conv2d(x, merged_weight, base.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_subset_adapts_q_and_v_and_leaves_k_exactly_frozen():
    torch.manual_seed(0)
    d = 8
    base = Conv1D(3 * d, d)  # GPT-2's c_attn: q, k, v side by side
    layer = _with_adapter(LoraFusedLinear(base, FusedParts(("q", "k", "v"), (d, d, d), ("q", "v"))))
    x = torch.randn(2, 5, d)
    A, B = _factors(layer)  # (2, r, d), (2, d, r)
    assert A.shape == (2, R, d) and B.shape == (2, d, R)
    out, plain = layer(x), base(x)
    torch.testing.assert_close(out[..., :d], plain[..., :d] + SCALE * x @ A[0].T @ B[0].T)
    assert torch.equal(out[..., d : 2 * d], plain[..., d : 2 * d])  # k: not a single bit
    torch.testing.assert_close(out[..., 2 * d :], plain[..., 2 * d :] + SCALE * x @ A[1].T @ B[1].T)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape == (d, 3 * d)
    assert torch.count_nonzero(delta[:, d : 2 * d]) == 0
    torch.testing.assert_close(delta[:, :d], (SCALE * B[0] @ A[0]).T)
    # each part initialises its own A with its own fan-in: both parts are random and differ
    assert not torch.equal(A[0], A[1])


def test_fused_subset_with_linear_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 12)
    layer = _with_adapter(LoraFusedLinear(base, FusedParts(("q", "k", "v"), (4, 4, 4), ("k",))))
    x = torch.randn(3, 6)
    merged = nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)
    torch.testing.assert_close(layer(x), merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoraLinear(nn.Linear(10, 6)),
        lambda: LoraConv1D(Conv1D(6, 10)),
        lambda: LoraEmbedding(nn.Embedding(20, 6)),
        lambda: LoraConv2d(nn.Conv2d(3, 5, 3)),
        lambda: LoraFusedLinear(Conv1D(12, 4), FusedParts(("q", "k", "v"), (4, 4, 4), ("q", "v"))),
    ],
)
def test_b_starts_at_zero_so_the_layer_equals_its_base(make):
    torch.manual_seed(0)
    layer = _with_adapter(make(), randomize=False)
    A, B = _factors(layer)
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    x = torch.randint(0, 20, (2, 3)) if isinstance(layer, LoraEmbedding) else None
    if x is None:
        x = torch.randn(2, 3, 9, 9) if isinstance(layer, LoraConv2d) else torch.randn(2, 3, 10)
        x = x[..., :4] if isinstance(layer, LoraFusedLinear) else x
    assert torch.equal(layer(x), layer.base_layer(x))


def test_merge_unmerge_idempotent_and_restores_w0():
    torch.manual_seed(0)
    layer = _with_adapter(LoraLinear(nn.Linear(16, 12)))
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 16)
    unmerged = layer(x)
    layer.merge()
    merged_weight = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)
    layer.merge()  # twice: nothing happens
    assert torch.equal(layer.base_layer.weight, merged_weight)
    torch.testing.assert_close(merged_weight, w0 + layer.delta_weight())
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    layer.unmerge()  # not merged: nothing happens
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)


def test_unmerge_subtracts_what_merge_added_even_after_the_factors_change():
    torch.manual_seed(0)
    layer = _with_adapter(LoraLinear(nn.Linear(16, 12)))
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():  # a step of training, or a new file, while merged
        layer.lora["default"].B.mul_(3.0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    # what is kept for it is a copy of the factors, not a dense ΔW
    layer.merge()
    record = layer.merged["default"]
    assert record.added is None and set(record.tensors) == {"A", "B"}


def test_eval_does_not_merge():
    layer = _with_adapter(LoraLinear(nn.Linear(8, 8)))
    w0 = layer.base_layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.base_layer.weight, w0) and layer.merged_adapters == []


def test_safe_merge_refuses_non_finite_delta_and_leaves_weight():
    layer = _with_adapter(LoraLinear(nn.Linear(8, 8)))
    with torch.no_grad():
        layer.lora["default"].A[0, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, w0) and layer.merged_adapters == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_factors_and_merges_in_fp32(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 32).to(dtype)
    w0 = base.weight.detach().clone()
    layer = _with_adapter(LoraLinear(base))
    assert layer.lora["default"].A.dtype == torch.float32
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    layer.merge()
    # cast once: the fp32 sum rounded to the base dtype, not a sum of rounded terms
    assert torch.equal(base.weight, (w0.float() + delta).to(dtype))
    x = torch.randn(3, 32).to(dtype)
    assert layer(x).dtype == dtype


def test_dropout_only_touches_the_low_rank_path():
    torch.manual_seed(0)
    layer = _with_adapter(LoraLinear(nn.Linear(8, 8)), dropout=0.5)
    x = torch.randn(64, 8)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)  # dropout is active in training
    with torch.no_grad():
        layer.lora["default"].B.zero_()
    assert torch.equal(layer(x), layer.base_layer(x))  # and never reaches the base path
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_gaussian_init_of_a():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(4096, 8))
    layer.add_adapter("default", R, ALPHA, SCALE, 0.0, "gaussian")
    std = layer.lora["default"].A.std().item()
    assert std == pytest.approx(1 / R, rel=0.05)


def test_wrapper_exposes_base_attributes():
    layer = LoraLinear(nn.Linear(10, 6))
    assert layer.in_features == 10 and layer.weight is layer.base_layer.weight
