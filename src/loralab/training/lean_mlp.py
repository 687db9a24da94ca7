"""The gated MLP of Llama-family blocks, ``down(silu(x W_gate) ⊙ x W_up)``, keeping two
tensors for the backward pass instead of three.

Autograd keeps ``gate = x W_gate`` for SiLU's gradient, and both ``silu(gate)`` and
``up = x W_up`` for the product's: three (tokens, intermediate) tensors a block, the
largest of a frozen base's saved activations (on SmolLM2 at 8 × 58 tokens, 245 of the
479 MB a LoRA step keeps). ``GatedProduct`` keeps ``gate`` and ``up`` and recomputes
``silu(gate)`` in the backward pass, one elementwise op: a third less for the MLP. The
matrix products' outputs are kept, so no product runs twice. The backward pass is the
one autograd runs for the plain expression (``silu_backward`` and the two products, in the
same order), so the loss and every gradient are the same to the last bit.

``lean_mlp(model)`` swaps this forward into every MLP whose forward is exactly that
expression (``LEAN_MLP_CLASSES``) for the length of a ``with`` block, and puts the
model's own back after it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Transformers MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
LEAN_MLP_CLASSES = frozenset(
    {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "OlmoMLP", "Olmo2MLP", "SmolLM3MLP"}
)


class GatedProduct(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def gated_product(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``; through ``GatedProduct`` where a backward pass will follow."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return GatedProduct.apply(gate, up)
    return F.silu(gate) * up


def _lean_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x)))


def is_lean_candidate(module: nn.Module) -> bool:
    """A gated MLP whose forward ``_lean_forward`` computes exactly, with SiLU."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return type(module).__name__ in LEAN_MLP_CLASSES and silu


@contextlib.contextmanager
def lean_mlp(model: nn.Module) -> Iterator[int]:
    """Inside the block every gated SiLU MLP of ``model`` saves two tensors, not three;
    yields how many MLPs that is (0: a model without such MLPs runs as it was)."""
    swapped = [m for m in model.modules() if is_lean_candidate(m) and "forward" not in vars(m)]
    for module in swapped:
        module.forward = types.MethodType(_lean_forward, module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward


__all__ = ["LEAN_MLP_CLASSES", "GatedProduct", "gated_product", "is_lean_candidate", "lean_mlp"]
