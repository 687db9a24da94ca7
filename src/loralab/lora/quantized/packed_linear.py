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

    @property
    def packed_bytes(self) -> int:
        return self.packed.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.block_format.name}, bias={self.bias is not None}"
        )


class PackedProduct(torch.autograd.Function):
    """``x Wᵀ`` for a packed ``W``: saves the packed bytes, and gives a gradient for ``x``
    alone (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, layer: PackedLinear) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(packed)
        return F.linear(x, layer.block_format.dequantize(packed, layer.in_features).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (packed,) = ctx.saved_tensors
        layer = ctx.layer
        weight = layer.block_format.dequantize(packed, layer.in_features).to(grad.dtype)
        return grad @ weight, None, None
