"""The one place that reads a frozen base layer: one small class per kind of layer.

What LoRA needs from the layer it wraps: the sizes of its input and output, where and in
what dtype it computes, its weight as a matrix (out, in), and how a ΔW in the weight's own
layout goes into that weight. Each kind answers for its modules: GPT-2's ``Conv1D`` stores
its weight transposed, (in, out), an embedding table is read by lookup, a convolution's
kernel is a matrix once flattened, a packed weight (``quantized/``: a GGUF file's blocks,
bitsandbytes' NF4, FP4 and int8) is unpacked on request and cannot take ΔW in place. A
new kind of base is one more class registered in ``KINDS``; the module-level functions
below are what the rest of loralab calls, whatever the kind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .quantized import PackedLinear, bnb
from .quantized.packed_linear import packed_from


class FrozenBase:
    """A dense ``nn.Linear``: weight (out, in), the layout every other kind maps to."""

    module_types: tuple[type, ...] = (nn.Linear,)
    role = "linear"
    """What the layer computes, which picks the LoRA layer class that wraps it: linear,
    conv1d (a linear map stored (in, out)), embedding or conv2d."""
    stored_in_out = False
    """Whether the weight lies (in, out): ``weight_matrix`` transposes it."""
    fan_in_fan_out = False
    """A linear map stored (in, out), as PEFT's ``fan_in_fan_out`` names it."""
    packed = False
    """Whether the weight is held packed (quantized), unpacked by the kind on request."""

    def matches(self, base: nn.Module) -> bool:
        return isinstance(base, self.module_types)

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def weight_of(self, base: nn.Module) -> Tensor:
        return base.weight

    def weight_shape(self, base: nn.Module) -> tuple[int, ...]:
        return tuple(base.weight.shape)

    def device(self, base: nn.Module) -> torch.device:
        return base.weight.device

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return base.weight.dtype

    def weight_copy(self, base: nn.Module) -> Tensor:
        return base.weight.detach().float().clone()

    def weight_matrix(self, base: nn.Module) -> Tensor:
        return matrix_of(base.weight.detach(), self.stored_in_out)

    def to_weight_layout(self, base: nn.Module, matrix: Tensor) -> Tensor:
        return in_weight_layout(matrix, tuple(base.weight.shape), self.stored_in_out)

    def fixed_reason(self, base: nn.Module) -> str | None:
        """Why ΔW cannot go into the stored weight in place (None: it can)."""
        return None

    def packed_size(self, base: nn.Module) -> tuple[int, int] | None:
        """(values, bytes) of a weight held outside the parameters, packed; None: the
        weight is a parameter, counted as one."""
        return None

    def add_to_weight(self, base: nn.Module, delta: Tensor) -> None:
        add_into(base.weight, delta)

    def dense_copy(self, base: nn.Module) -> nn.Module:
        """A dense layer computing what ``base`` computes (``base`` itself when dense)."""
        return base

    def quantized_like(self, base: nn.Module, dense: nn.Module) -> nn.Module:
        """``dense`` stored as ``base`` is (the same format): re-quantizing a merge."""
        return dense


class Conv1DBase(FrozenBase):
    """GPT-2's ``Conv1D``: a linear map whose weight is stored (in, out)."""

    module_types = (Conv1D,)
    role = "conv1d"
    stored_in_out = True
    fan_in_fan_out = True

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        rows, columns = base.weight.shape
        return rows, columns


class EmbeddingBase(FrozenBase):
    """An embedding table (num, dim): the map from a one-hot token to its row."""

    module_types = (nn.Embedding,)
    role = "embedding"
    stored_in_out = True

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim


class Conv2dBase(FrozenBase):
    """A 2-D convolution: its kernel (out, in, kh, kw) as the matrix (out, in · kh · kw)."""

    module_types = (nn.Conv2d,)
    role = "conv2d"

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels


class PackedBase(FrozenBase):
    """A linear map whose weight (out, in) stays packed in blocks (``PackedLinear``): read
    by unpacking it, and never changed in place (ΔW has nowhere exact to go in 4 bits)."""

    module_types = (PackedLinear,)
    packed = True

    def weight_of(self, base: nn.Module) -> Tensor:
        return base.packed

    def weight_shape(self, base: nn.Module) -> tuple[int, ...]:
        return base.out_features, base.in_features

    def device(self, base: nn.Module) -> torch.device:
        return base.packed.device

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return base.dtype

    def weight_copy(self, base: nn.Module) -> Tensor:
        return base.dequantized().float()

    def weight_matrix(self, base: nn.Module) -> Tensor:
        return base.dequantized().float()

    def to_weight_layout(self, base: nn.Module, matrix: Tensor) -> Tensor:
        return matrix

    def fixed_reason(self, base: nn.Module) -> str | None:
        return (
            f"its weight is packed ({base.block_format.name} blocks) and cannot take ΔW in "
            "place; merge into a dense copy (`loralab merge` writes one) or load the base "
            "without --quantized-base"
        )

    def add_to_weight(self, base: nn.Module, delta: Tensor) -> None:
        raise TypeError(self.fixed_reason(base))

    def packed_size(self, base: nn.Module) -> tuple[int, int] | None:
        return base.out_features * base.in_features, base.packed.numel()

    def dense_copy(self, base: nn.Module) -> nn.Module:
        return dense_linear(base, self.weight_matrix(base).to(base.dtype))

    def quantized_like(self, base: nn.Module, dense: nn.Module) -> nn.Module:
        return packed_from(dense, base.block_format)


class BitsAndBytesBase(PackedBase):
    """bitsandbytes' ``Linear4bit`` (NF4, FP4) and ``Linear8bitLt`` (int8): the layer's
    own product runs as it is, after ``bnb.keep_training_layout`` (see there)."""

    module_types = ()

    def matches(self, base: nn.Module) -> bool:
        return bnb.is_quantized_layer(base)

    def weight_of(self, base: nn.Module) -> Tensor:
        return base.weight

    def device(self, base: nn.Module) -> torch.device:
        return base.weight.device

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return bnb.compute_dtype(base)

    def weight_copy(self, base: nn.Module) -> Tensor:
        return bnb.dequantized(base)

    def weight_matrix(self, base: nn.Module) -> Tensor:
        return bnb.dequantized(base)

    def fixed_reason(self, base: nn.Module) -> str | None:
        return (
            f"its weight is quantized by bitsandbytes ({bnb.format_name(base)}) and cannot "
            "take ΔW in place; merge_and_unload writes a dequantized, dense copy (`loralab "
            "merge`), or load the base without --quantized-base"
        )

    def packed_size(self, base: nn.Module) -> tuple[int, int] | None:
        return base.out_features * base.in_features, bnb.stored_bytes(base)

    def dense_copy(self, base: nn.Module) -> nn.Module:
        return dense_linear(base, bnb.dequantized(base).to(bnb.stored_dtype(base)))

    def quantized_like(self, base: nn.Module, dense: nn.Module) -> nn.Module:
        return bnb.quantized_like(base, dense)


# The kinds, the most specific first: one line per kind.
KINDS: tuple[FrozenBase, ...] = (
    Conv1DBase(),
    EmbeddingBase(),
    Conv2dBase(),
    PackedBase(),
    BitsAndBytesBase(),
    FrozenBase(),
)


def kind_of(base: nn.Module) -> FrozenBase:
    """The kind that answers for ``base``; a module of no registered kind is an error."""
    kind = kind_or_none(base)
    if kind is None:
        raise TypeError(f"{type(base).__name__} is no kind of frozen base loralab reads")
    return kind


def kind_or_none(base: nn.Module) -> FrozenBase | None:
    """The kind that answers for ``base``, or None (a module LoRA does not wrap)."""
    return next((kind for kind in KINDS if kind.matches(base)), None)


def role_of(module: nn.Module) -> str | None:
    """What ``module`` computes as a frozen base (``FrozenBase.role``), or None."""
    kind = kind_or_none(module)
    return None if kind is None else kind.role


def is_linear_map(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer of any kind (dense, GPT-2's Conv1D, packed):
    what ``target_modules="all-linear"`` looks for."""
    return role_of(module) in ("linear", "conv1d")


def packed_in(module: nn.Module) -> str | None:
    """Why the weights inside ``module`` cannot be trained or changed in place (the first
    packed one's reason), or None: methods that train base weights ask it first."""
    for name, inner in module.named_modules():
        kind = kind_or_none(inner)
        reason = kind.fixed_reason(inner) if kind is not None else None
        if reason is not None:
            return f"{name}: {reason}"
    return None


def is_packed(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen base whose weight is held packed (quantized)."""
    kind = kind_or_none(module)
    return kind is not None and kind.packed


def packed_size(module: nn.Module) -> tuple[int, int] | None:
    """(values, bytes) of ``module``'s weight where it is held packed, outside the
    parameters (None: not a base, or a dense one)."""
    kind = kind_or_none(module)
    return None if kind is None else kind.packed_size(module)


def weight_of(base: nn.Module) -> Tensor:
    """The stored weight (to find what else holds it, such as a tied head)."""
    return kind_of(base).weight_of(base)


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
    """The shape of the weight as the layer computes with it (a packed one's (out, in))."""
    return kind_of(base).weight_shape(base)


def device(base: nn.Module) -> torch.device:
    return kind_of(base).device(base)


def compute_dtype(base: nn.Module) -> torch.dtype:
    return kind_of(base).compute_dtype(base)


def factor_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of an adapter's factors on this base (``factor_dtype_for``)."""
    return factor_dtype_for(compute_dtype(base))


def factor_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapter's factors on a weight of ``dtype``: fp32 on a half-precision
    one (the factors are tiny, and the low-rank path is where precision is lost first)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def add_into(weight: Tensor, delta: Tensor) -> None:
    """``weight ← weight + delta`` in place, computed in fp32 and cast once."""
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def weight_copy(base: nn.Module) -> Tensor:
    """The weight in its stored layout (the layout of ``delta_weight()``), as a new fp32
    tensor detached from the model."""
    return kind_of(base).weight_copy(base)


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


def fixed_reason(base: nn.Module) -> str | None:
    """Why ΔW cannot be added into ``base``'s weight in place (a packed weight), or None:
    merging and inits that rewrite W0 ask this before they change anything."""
    return kind_of(base).fixed_reason(base)


def add_to_weight(base: nn.Module, delta: Tensor) -> None:
    """``W ← W + ΔW``, computed in fp32 and cast once (ΔW in the stored weight's layout)."""
    kind_of(base).add_to_weight(base, delta)


def dense_linear(base: nn.Module, weight: Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) and ``base``'s bias, on its device."""
    bias = bias_of(base)
    linear = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return linear


def dense_copy(base: nn.Module) -> nn.Module:
    """A dense layer computing what the (packed) ``base`` computes, with its weight
    unpacked: what merging into a quantized base starts from."""
    return kind_of(base).dense_copy(base)


def quantized_like(base: nn.Module, dense: nn.Module) -> nn.Module:
    """``dense``'s weight stored as ``base``'s is: an explicit re-quantization after a
    merge, which loses most of a small update (the caller says so)."""
    return kind_of(base).quantized_like(base, dense)
