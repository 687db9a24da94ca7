"""PiSSA (Meng et al., 2024): the factors start as W0's principal part, W0 keeps the rest.

``A = √(S_r / s) V_rᵀ`` and ``B = U_r √(S_r / s)`` from the top r singular triplets of W0
(out, in), so that ``s·B A`` is W0's best rank-r approximation and the layer takes it out
of W0 (``nn.Module._take_out_start``): training then moves the principal directions
instead of starting from zero. ``pissa_niter_N`` takes the triplets from a randomized SVD
with N subspace iterations (much faster on large matrices), seeded here, so that a
reload (a resumed run) draws the same start. PEFT's ``init_lora_weights="pissa"`` is the
same start; an adapter saved for the original base is PEFT's conversion of it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .. import frozen_base
from .from_weight import FromWeight
from .registry import register_init


@register_init
class Pissa(FromWeight):
    name = "pissa"
    pattern = r"pissa(_niter_[1-9]\d*)?"

    def start(self, layer: nn.Module, factors: nn.Module) -> None:
        weight = frozen_base.weight_matrix(layer.base_layer).float()  # (out, in)
        r = factors.A.shape[0]
        iterations = re.fullmatch(r"pissa_niter_(\d+)", self.name)
        if iterations is None:
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            with torch.random.fork_rng(devices=[]):  # the same start on every load
                torch.manual_seed(0)
                U, S, V = torch.svd_lowrank(weight, q=r, niter=int(iterations.group(1)))
            Vh = V.T
        root = (S / factors.scale).sqrt()
        factors.A.copy_(root[:, None] * Vh)
        factors.B.copy_(U * root[None, :])
