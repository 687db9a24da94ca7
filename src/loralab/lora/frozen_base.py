"""The one place that reads a frozen base layer: one small class per kind of layer.

What LoRA needs from the layer it wraps: the sizes of its input and output, where and in
what dtype it computes, its weight as a matrix (out, in), and how a ΔW in the weight's own
layout goes into that weight. Each kind answers for its modules: GPT-2's ``Conv1D`` stores
its weight transposed, (in, out), an embedding table is read by lookup, a convolution's
kernel is a matrix once flattened. A new kind of base (a quantized one) is one more class
registered in ``KINDS``; the module-level functions below are what the rest of loralab
calls, whatever the kind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


class FrozenBase:
    """A dense ``nn.Linear``: weight (out, in), the layout every other kind maps to."""

    module_types: tuple[type, ...] = (nn.Linear,)
    stored_in_out = False
    """Whether the weight lies (in, out): ``weight_matrix`` transposes it."""
    fan_in_fan_out = False
    """A linear map stored (in, out), as PEFT's ``fan_in_fan_out`` names it."""

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def weight_matrix(self, base: nn.Module) -> Tensor:
        return matrix_of(base.weight.detach(), self.stored_in_out)

    def to_weight_layout(self, base: nn.Module, matrix: Tensor) -> Tensor:
        return in_weight_layout(matrix, tuple(base.weight.shape), self.stored_in_out)

    def add_to_weight(self, base: nn.Module, delta: Tensor) -> None:
        weight = base.weight
        with torch.no_grad():
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


class Conv1DBase(FrozenBase):
    """GPT-2's ``Conv1D``: a linear map whose weight is stored (in, out)."""

    module_types = (Conv1D,)
    stored_in_out = True
    fan_in_fan_out = True

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        rows, columns = base.weight.shape
        return rows, columns


class EmbeddingBase(FrozenBase):
    """An embedding table (num, dim): the map from a one-hot token to its row."""

    module_types = (nn.Embedding,)
    stored_in_out = True

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim


class Conv2dBase(FrozenBase):
    """A 2-D convolution: its kernel (out, in, kh, kw) as the matrix (out, in · kh · kw)."""

    module_types = (nn.Conv2d,)

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels


# The kinds, the most specific first: one line per kind.
KINDS: tuple[FrozenBase, ...] = (
    Conv1DBase(),
    EmbeddingBase(),
    Conv2dBase(),
    FrozenBase(),
)


def kind_of(base: nn.Module) -> FrozenBase:
    """The kind that answers for ``base``; a module of no registered kind is an error."""
    for kind in KINDS:
        if isinstance(base, kind.module_types):
            return kind
    raise TypeError(f"{type(base).__name__} is no kind of frozen base loralab reads")


def weight_of(base: nn.Module) -> nn.Parameter:
    """The stored weight parameter (to find what else holds it, such as a tied head)."""
    return base.weight


def fan_in_fan_out(base: nn.Module) -> bool:
    """Whether a linear map stores its weight (in, out) rather than PyTorch's (out, in)."""
    return kind_of(base).fan_in_fan_out


def in_out(base: nn.Module) -> tuple[int, int]:
    """(inputs, outputs): features of a linear map, rows and width of an embedding table,
    channels of a convolution."""
    return kind_of(base).in_out(base)


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
    return kind_of(base).weight_matrix(base)


def to_weight_layout(base: nn.Module, matrix: Tensor) -> Tensor:
    """A matrix in ``weight_matrix``'s layout, in the layout of the stored weight."""
    return kind_of(base).to_weight_layout(base, matrix)


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
    kind_of(base).add_to_weight(base, delta)
