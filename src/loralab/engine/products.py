"""The fp32 base products of a step at a few rows, run on every thread.

MKL multiplies a few rows by a weight on one thread: on a 2-core AVX2 EPYC, one row times
the 425 MB of SmolLM2-135M's layer weights read 11–12 GB/s, where two threads read 32
GB/s (``benchmarks/bench_small_matmuls.py``), and llama.cpp's decoding, which splits each
product across its threads, ran 2.7× faster than the engine at one stream. PyTorch's
``bmm`` runs the products of its batch on its threads in parallel, so the weight's output
rows are cut into slices (views: nothing is copied) and multiplied as one batch.

Each output is still the same dot product by the same kernel, so the numbers are
expected to be the same bits as ``F.linear``'s, which the engine's exactness against
Transformers rests on; this is MKL's behaviour, not its promise, so every shape, row
count and form (plain, with a bias, accumulated onto an update) is checked once on this
machine before it is split, and runs unsplit where the bits differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROWS = 32  # above this, MKL's own threading of the product pays (measured)
MIN_SLICES = 8  # fewer slices than this gained less at 2–32 rows (measured)
MAX_SLICE = 4096  # wider weights (an output head) are cut finer: each slice ≤ this
MAX_SPLIT = 128

# (out, in, rows, form) of fp32 products → the slices to cut into (1: whole), once checked.
_CHECKED: dict[tuple, int] = {}


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, onto: Tensor | None = None
) -> Tensor:
    """``x Wᵀ + b`` (``x``: (rows, in), ``weight``: (out, in)), accumulated onto ``onto``
    (rows, out) when given, as ``torch.addmm(onto, x, Wᵀ)`` does (bias and ``onto`` are
    not given together); the same bits as PyTorch's product, faster at a few rows."""
    form = "bias" if bias is not None else "onto" if onto is not None else "plain"
    slices = _slices_for(x, weight, form)
    if slices == 1:
        if onto is not None:
            return torch.addmm(onto, x, weight.T)
        return F.linear(x, weight, bias)
    return _split(x, weight, slices, bias if bias is not None else onto)


def _split(x: Tensor, weight: Tensor, slices: int, onto: Tensor | None) -> Tensor:
    rows, inner = x.shape
    outputs = weight.shape[0]
    batch = x.unsqueeze(0).expand(slices, rows, inner)
    parts = weight.view(slices, outputs // slices, inner).transpose(1, 2)
    if onto is None:
        out = torch.bmm(batch, parts)
    else:  # each slice accumulates onto its columns of ``onto``, as the whole product would
        onto = onto.expand(rows, outputs).reshape(rows, slices, outputs // slices)
        out = torch.baddbmm(onto.transpose(0, 1), batch, parts)
    if rows == 1:  # (slices, 1, width) is already the row's outputs in order
        return out.view(1, outputs)
    return out.transpose(0, 1).reshape(rows, outputs)


def _slices_for(x: Tensor, weight: Tensor, form: str) -> int:
    if (
        x.dim() != 2
        or x.shape[0] > MAX_ROWS
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or not weight.is_contiguous()
        or torch.get_num_threads() < 2
    ):
        return 1
    key = (*weight.shape, x.shape[0], form)
    slices = _CHECKED.get(key)
    if slices is None:
        slices = _CHECKED[key] = checked_slices(weight, x.shape[0], form)
    return slices


def slices(outputs: int) -> int:
    """How many slices a weight of ``outputs`` rows is cut into (1: it is not cut): at
    least ``MIN_SLICES`` and each at most ``MAX_SLICE`` wide, a power of two that divides
    ``outputs``."""
    count = 1
    while count * 2 <= MAX_SPLIT and outputs % (count * 2) == 0:
        count *= 2
        if count >= MIN_SLICES and outputs // count <= MAX_SLICE:
            break
    return count


def checked_slices(weight: Tensor, rows: int, form: str) -> int:
    """``slices`` for ``weight`` if splitting it gives the same bits on this machine for
    ``rows`` rows of random inputs, else 1."""
    count = slices(weight.shape[0])
    if count == 1:
        return 1
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, weight.shape[1], generator=generator)
    outputs = weight.shape[0]
    with torch.no_grad():
        if form == "plain":
            expected, onto = x @ weight.T, None
        elif form == "bias":
            onto = torch.randn(outputs, generator=generator)
            expected = F.linear(x, weight, onto)
        else:
            onto = torch.randn(rows, outputs, generator=generator)
            expected = torch.addmm(onto, x, weight.T)
        same = torch.equal(_split(x, weight.detach(), count, onto), expected)
    return count if same else 1
