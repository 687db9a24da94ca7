"""``PackedLinear``: a frozen linear layer whose weight stays in its packed blocks.

The forward unpacks the weight, multiplies, and lets the unpacked copy go; the backward
unpacks it again for the input's gradient. Only the packed bytes are saved for the
backward, so a step holds one layer's dense weight at a time instead of every layer's
(a plain ``F.linear(x, dequantize(W))`` would keep each one until the backward reaches
it). The weight has no gradient: the layer is a frozen base, trained around by LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block_format import BlockFormat


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` (out, in) stored as ``block_format``'s packed rows."""

    def __init__(
        self,
        packed: Tensor,
        block_format: BlockFormat,
        in_features: int,
        out_features: int,
        bias: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        reason = block_format.refusal(in_features)
        if reason is not None:
            raise ValueError(reason)
        expected = (out_features, block_format.row_bytes(in_features))
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise ValueError(
                f"a {block_format.name} weight of {out_features}×{in_features} is uint8 "
                f"{expected}; got {packed.dtype} {tuple(packed.shape)}"
            )
        self.block_format = block_format
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        """The dtype the weight is unpacked to and computes in."""
        # Not in the state dict: a packed model is never saved whole (merging writes a
        # dense one), and its keys stay those of the adapter alone.
        self.register_buffer("packed", packed, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def dequantized(self) -> Tensor:
        """The weight (out, in) in ``dtype``, a new tensor."""
        return self.block_format.dequantize(self.packed, self.in_features).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = PackedProduct.apply(x.to(self.dtype), self.packed, self)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.block_format.name}, bias={self.bias is not None}"
        )


# A large weight is unpacked a part at a time, each part used while it sits in the cache:
# on a 11008 × 4096 Q4_0 weight and 128 tokens, unpacking it whole and multiplying took
# 150 ms forward and 144 ms backward, by parts of about a million values 70 and 76 ms (the
# dense product alone: 47 and 44 ms). The parts split the outputs (rows forward, columns
# backward), never a sum, so every number is the one the whole product gives.
PART_VALUES = 1 << 20


class PackedProduct(torch.autograd.Function):
    """``x Wᵀ`` for a packed ``W``: saves the packed bytes, and gives a gradient for ``x``
    alone (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, layer: PackedLinear) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(packed)
        block_format, columns = layer.block_format, layer.in_features
        rows = max(1, PART_VALUES // columns)
        if rows >= layer.out_features:
            return F.linear(x, block_format.dequantize(packed, columns).to(x.dtype))
        y = x.new_empty(*x.shape[:-1], layer.out_features)
        for start in range(0, layer.out_features, rows):
            part = block_format.dequantize(packed[start : start + rows], columns)
            y[..., start : start + rows] = F.linear(x, part.to(x.dtype))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (packed,) = ctx.saved_tensors
        layer = ctx.layer
        block_format, columns = layer.block_format, layer.in_features
        step = block_format.block_values
        width = max(step, PART_VALUES // layer.out_features // step * step)
        if width >= columns:
            return grad @ block_format.dequantize(packed, columns).to(grad.dtype), None, None
        grad_x = grad.new_empty(*grad.shape[:-1], columns)
        for start in range(0, columns, width):
            stop = min(start + width, columns)
            part = block_format.dequantize_columns(packed, start, stop).to(grad.dtype)
            grad_x[..., start:stop] = grad @ part
        return grad_x, None, None


def packed_from(dense: nn.Linear, block_format: BlockFormat) -> PackedLinear:
    """``dense``'s weight quantized into ``block_format`` by the ``gguf`` package's
    quantizer (the numbers llama.cpp's own conversion writes). The package writes Q4_0,
    Q4_1 and Q8_0; a format it cannot write (the K-quants) is refused by name."""
    import gguf  # the writer's package, needed only when quantizing

    reason = block_format.refusal(dense.in_features)
    if reason is not None:
        raise ValueError(reason)
    weight = dense.weight.detach().float().cpu().numpy()
    try:
        packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType(block_format.ggml_type))
    except NotImplementedError as error:
        raise ValueError(
            f"the gguf package cannot quantize into {block_format.name}; only Q4_0, Q4_1 and Q8_0"
        ) from error
    bias = None if dense.bias is None else dense.bias.detach()
    return PackedLinear(
        torch.from_numpy(packed).to(dense.weight.device),
        block_format,
        dense.in_features,
        dense.out_features,
        bias,
        dense.weight.dtype,
    )
