"""OLoRA (Büyükakyüz, 2024): the factors start as the first r columns of W0's QR
decomposition, W0 keeps the rest.

``W0 = Q R`` (out, in); ``B = Q[:, :r]`` (orthonormal columns) and ``A = R[:r]``, and the
layer takes ``s·B A`` out of W0 (``nn.Module._take_out_start``), so that training starts
on an orthonormal basis of W0's leading columns. PEFT's ``init_lora_weights="olora"`` is
the same start; an adapter saved for the original base is PEFT's conversion of it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import frozen_base
from .from_weight import FromWeight
from .registry import register_init


@register_init
class OLora(FromWeight):
    name = "olora"

    def start(self, layer: nn.Module, factors: nn.Module) -> None:
        weight = frozen_base.weight_matrix(layer.base_layer).float()  # (out, in)
        r = factors.A.shape[0]
        Q, R = torch.linalg.qr(weight)
        factors.A.copy_(R[:r])
        factors.B.copy_(Q[:, :r])
