"""The random inits: ``B = 0`` so that ΔW = 0 at step 0 (Sec. 4.1), and ``A`` drawn.

``kaiming``: Kaiming-uniform with a = √5, as the paper's code draws A (an embedding's A,
read by lookup rather than by a product over its fan-in, is N(0, 1) as loralib's).
``gaussian``: N(0, 1/r).
"""

from __future__ import annotations

import math

from torch import nn

from .registry import Init, register_init


@register_init
class Kaiming(Init):
    name = "kaiming"

    def peft_value(self) -> bool | str:
        return True

    def start(self, layer: nn.Module, factors: nn.Module) -> None:
        for A in layer.a_matrices(factors):
            if layer.reads_a_by_lookup:
                nn.init.normal_(A, std=1.0)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))


@register_init
class Gaussian(Init):
    name = "gaussian"

    def start(self, layer: nn.Module, factors: nn.Module) -> None:
        for A in layer.a_matrices(factors):
            nn.init.normal_(A, std=1 / A.shape[0])  # N(0, 1/r)
