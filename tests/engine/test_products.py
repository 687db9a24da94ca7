"""The engine's fp32 products at a few rows (``engine/products.py``): a weight's output
rows cut into slices and multiplied as one batch on every thread, the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loralab.engine import products

FORMS = ("plain", "bias", "onto")


def _inputs(rows: int, outputs: int, inner: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, inner, generator=generator) * 0.05
    # a strided view, as the head gets the last position of (R, T, hidden)
    x = torch.randn(rows, 3, inner, generator=generator)[:, 1]
    bias = torch.randn(outputs, generator=generator)
    onto = torch.randn(rows, outputs, generator=generator) * 0.01
    return x, weight, bias, onto


def _expected(form, x, weight, bias, onto):
    if form == "plain":
        return x @ weight.T
    if form == "bias":
        return F.linear(x, weight, bias)
    return torch.addmm(onto, x, weight.T)


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
@pytest.mark.parametrize("form", FORMS)
def test_the_sliced_product_computes_the_product(rows, form):
    """The batch of slices itself (whatever the bits): each slice's outputs land in their
    own columns, the bias and the accumulated update on theirs."""
    x, weight, bias, onto = _inputs(rows, 96, 40)
    extra = {"plain": None, "bias": bias, "onto": onto}[form]
    for count in (2, 8, 32):
        got = products._split(x, weight, count, extra)
        torch.testing.assert_close(
            got, _expected(form, x, weight, bias, onto), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("form", FORMS)
def test_linear_gives_the_same_bits_as_pytorch(form):
    """Split or not, ``linear`` returns PyTorch's own bits at every row count up to the
    limit and beyond (the engine's exactness against Transformers rests on it)."""
    for rows in (1, 2, 5, 8, 17, 32, 33):
        x, weight, bias, onto = _inputs(rows, 192, 64, seed=rows)
        got = products.linear(
            x, weight, bias if form == "bias" else None, onto if form == "onto" else None
        )
        assert torch.equal(got, _expected(form, x, weight, bias, onto)), (form, rows)


def test_a_split_whose_bits_differ_is_not_used(monkeypatch):
    """The check is what keeps the bits: were a machine's sliced products to round
    differently, the products run whole there."""
    monkeypatch.setattr(products, "_CHECKED", {})
    split = products._split
    monkeypatch.setattr(
        products, "_split", lambda x, w, count, onto: split(x, w, count, onto) * (1 + 2**-20)
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x, weight, bias, onto = _inputs(4, 128, 32)
    for form in FORMS:
        got = products.linear(
            x, weight, bias if form == "bias" else None, onto if form == "onto" else None
        )
        assert torch.equal(got, _expected(form, x, weight, bias, onto))
    assert set(products._CHECKED.values()) == {1}


def test_the_split_is_kept_where_the_bits_agree(monkeypatch):
    """Where the slices give the same bits (forced here), the product runs split, and once
    checked a shape is not checked again."""
    monkeypatch.setattr(products, "_CHECKED", {})
    calls = []
    split = products._split

    def counted(x, w, count, onto):
        calls.append(count)
        return split(x, w, count, onto)

    monkeypatch.setattr(products, "_split", counted)
    monkeypatch.setattr(
        products, "checked_slices", lambda w, rows, form: products.slices(w.shape[0])
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x, weight, _, _ = _inputs(2, 1536, 32)
    products.linear(x, weight)
    products.linear(x, weight)
    assert calls == [8, 8]
    products.linear(*_inputs(40, 1536, 32)[:2])  # above MAX_ROWS: whole
    assert calls == [8, 8]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: nothing to split over
    products.linear(x, weight)
    assert calls == [8, 8]


def test_how_a_weight_is_sliced():
    assert products.slices(576) == 8
    assert products.slices(1536) == 8
    assert products.slices(49152) == 16  # a vocabulary: slices of at most 4,096 outputs
    assert products.slices(151936) == 64  # Qwen's 2^7 · 1187 outputs: 2,374 each
    assert products.slices(100) == 4  # the largest power of two dividing it
    assert products.slices(97) == 1  # odd: not sliced
