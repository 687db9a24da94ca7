"""LoRA's low-rank path with dropout, ``scale · B A dropout(x)``, keeping a mask for the
backward pass instead of a dropped copy of the input.

Written plainly, ``dropout(x)`` is a new (…, in) tensor that A's product saves for A's
gradient: 4 bytes an element per adapted layer, on top of x itself. ``LowRankDropout``
saves x (which the layers adapted side by side, such as W_q and W_v, share) and a 1-byte
mask, and rebuilds ``dropout(x)`` in the backward pass. The mask is drawn exactly as
``nn.Dropout`` draws it on the CPU (``bernoulli_(1 − p)``, one draw per element of x), so
with the same generator state the output and every gradient are the plain computation's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def low_rank_path(x: Tensor, A: Tensor, B: Tensor, scale: float, dropout: nn.Module) -> Tensor:
    """``scale · B A dropout(x)``: (…, in) -> (…, r) -> (…, out)."""
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        if dropout.p >= 1:
            return x.new_zeros(*x.shape[:-1], B.shape[0])
        if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x.requires_grad):
            return LowRankDropout.apply(x, A, B, scale, dropout.p)
    return F.linear(F.linear(dropout(x), A), B) * scale


class LowRankDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
        # nn.Dropout's draws: one Bernoulli(1 − p) per element, in order, whatever the dtype
        kept = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        noise = kept.to(x.dtype).div_(1 - p)
        hidden = F.linear(x * noise, A)  # (…, r)
        ctx.save_for_backward(x, kept, A, B, hidden)
        ctx.scale, ctx.keep = scale, 1 - p
        return F.linear(hidden, B) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, kept, A, B, hidden = ctx.saved_tensors
        dtype = A.dtype  # under autocast the forward's products ran in lower precision
        grad = grad.to(dtype) * ctx.scale  # (…, out)
        hidden = hidden.to(dtype)
        noise = kept.to(x.dtype).div_(ctx.keep)  # the forward's values exactly
        grad_hidden = grad @ B  # (…, r)
        grad_A = grad_B = grad_x = None
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).to(dtype).reshape(-1, A.shape[1])
            grad_A = grad_hidden.reshape(-1, A.shape[0]).T @ dropped  # (r, in)
        if ctx.needs_input_grad[2]:
            grad_B = grad.reshape(-1, B.shape[0]).T @ hidden.reshape(-1, A.shape[0])  # (out, r)
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_hidden @ A) * noise).to(x.dtype)
        return grad_x, grad_A, grad_B, None, None


__all__ = ["LowRankDropout", "low_rank_path"]
