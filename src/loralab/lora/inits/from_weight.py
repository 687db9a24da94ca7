"""What the inits that start from the frozen weight (PiSSA, OLoRA) share: they rewrite
the base, and they need one plain weight matrix."""

from __future__ import annotations

from torch import nn

from .registry import Init


def plain_matrix_refusal(layer: nn.Module) -> str | None:
    """Why a start read from W0 cannot go on ``layer``: it needs one plain weight matrix
    (a Linear or GPT-2's Conv1D), not fused parts, an embedding, a conv or DoRA's layer."""
    if layer.one_plain_matrix:
        return None
    return f"it starts from the SVD or QR of one weight matrix; {type(layer).__name__} has none"


class FromWeight(Init):
    """An init that reads W0 and starts at ΔW ≠ 0, which the layer takes out of W0."""

    rewrites_base = True

    def refusal(self, layer: nn.Module) -> str | None:
        return plain_matrix_refusal(layer)
