"""The one place that reads a frozen base layer.

What LoRA needs from the layer it wraps: the sizes of its input and output, where and in
what dtype it computes, its weight as a matrix (out, in), and how a ΔW in the weight's own
layout goes into that weight. GPT-2's ``Conv1D`` stores its weight transposed, (in, out):
that rule is here and nowhere else. A quantized base plugs in by answering the same
questions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def weight_of(base: nn.Module) -> nn.Parameter:
    """The stored weight parameter (to find what else holds it, such as a tied head)."""
    return base.weight


def fan_in_fan_out(base: nn.Module) -> bool:
    """Whether a linear map stores its weight (in, out) rather than PyTorch's (out, in):
    GPT-2's ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    return isinstance(base, Conv1D)


def _stored_in_out(base: nn.Module) -> bool:
    # A Conv1D's weight, and an embedding table (num, dim) read by lookup, lie (in, out).
    return isinstance(base, (Conv1D, nn.Embedding))


def in_out(base: nn.Module) -> tuple[int, int]:
    """(inputs, outputs): features of a linear map, rows and width of an embedding table,
    channels of a convolution."""
    if isinstance(base, Conv1D):
        rows, columns = base.weight.shape
        return rows, columns
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    return base.in_features, base.out_features


def bias_of(base: nn.Module) -> Tensor | None:
    """The bias added after the weight's product, if the layer has one."""
    bias = getattr(base, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def weight_shape(base: nn.Module) -> tuple[int, ...]:
    return tuple(base.weight.shape)


def device(base: nn.Module) -> torch.device:
    return base.weight.device


def compute_dtype(base: nn.Module) -> torch.dtype:
    return base.weight.dtype


def factor_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of an adapter's factors on this base: fp32 on a half-precision base (the
    factors are tiny, and the low-rank path is where precision is lost first)."""
    dtype = compute_dtype(base)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def weight_copy(base: nn.Module) -> Tensor:
    """The weight in its stored layout (the layout of ``delta_weight()``), as a new fp32
    tensor detached from the model."""
    return base.weight.detach().float().clone()


def weight_matrix(base: nn.Module) -> Tensor:
    """The weight as the matrix (out, in) that maps an input to an output, in fp32,
    detached: a conv's kernel flattened to (out, in · kh · kw), an embedding table as
    (dim, num), the map from a one-hot token to its row."""
    return matrix_of(base.weight.detach(), _stored_in_out(base))


def to_weight_layout(base: nn.Module, matrix: Tensor) -> Tensor:
    """A matrix in ``weight_matrix``'s layout, in the layout of the stored weight."""
    return in_weight_layout(matrix, tuple(base.weight.shape), _stored_in_out(base))


def matrix_of(weight: Tensor, stored_in_out: bool) -> Tensor:
    """``weight_matrix`` for a weight tensor alone (a state dict's), given its layout."""
    weight = weight.float()
    if stored_in_out:
        return weight.T
    return weight.flatten(1) if weight.dim() > 2 else weight


def in_weight_layout(matrix: Tensor, shape: tuple[int, ...], stored_in_out: bool) -> Tensor:
    """``to_weight_layout`` for a weight of ``shape`` alone, given its layout."""
    return matrix.T if stored_in_out else matrix.view(shape)


def add_to_weight(base: nn.Module, delta: Tensor) -> None:
    """``W ← W + ΔW``, computed in fp32 and cast once (ΔW in the stored weight's layout)."""
    weight = base.weight
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
