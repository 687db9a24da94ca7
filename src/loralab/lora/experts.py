"""LoRA on a mixture of experts' fused 3-D weights (PEFT's ``target_parameters``).

Transformers (v5) keeps a block's experts as one module holding stacked weights:
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), each expert's (out, in) matrix
as ``nn.Linear`` lays it, or (E, in, out) where the module says ``is_transposed``
(gpt-oss). They are parameters, not modules, so module matching never reaches them.
Here each expert e of an adapted weight gets its own update ``ΔW_e = s · B_e A_e``:
A (E, r, in) and B (E, out, r), rank r per expert.

One wrapper adapts one weight (``LoraExperts``); a second adapted weight of the same
module wraps the first wrapper, as PEFT nests its ``ParamWrapper``: so the module
names, and with them PEFT's tensor names, come out as PEFT writes them (the weight
registered first innermost: ``experts.base_layer.lora_A.weight`` for ``gate_up_proj``,
``experts.lora_A.weight`` for ``down_proj``). PEFT stores A as (E·r, in), expert-major,
and B as (out, r·E), rank-major (column k·E + e); ``to_peft`` and ``from_peft`` convert.

The forward never builds ``W_e + ΔW_e``: the outermost wrapper runs the experts' own
computation (Transformers' experts interface: its gate, activation, biases, layout)
over the routed tokens, adding ``s · (x A_eᵀ) B_eᵀ`` to each adapted projection, so an
adapter costs r·(in + out) per routed token and expert rather than a copy of every
expert's weights (PEFT's parametrization builds that copy at each forward).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import frozen_base as bases
from .layers import LoraFactors, LoraLayer

# The stacked weights an adapter may target, as Transformers names them.
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
# Short names, resolved on any model with Transformers' experts interface.
SHORT_NAMES = {
    "experts": ("gate_up_proj", "up_proj", "down_proj"),
    "experts.gate_up": ("gate_up_proj", "up_proj"),
    "experts.down": ("down_proj",),
}


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a block's experts with Transformers' experts interface (the
    flags its ``use_experts_implementation`` sets, and stacked 3-D weights)."""
    if isinstance(module, LoraExperts):
        return False
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and isinstance(down, nn.Parameter)
        and down.dim() == 3
    )


def stacked_weights(module: nn.Module) -> list[str]:
    """The 3-D weights of an experts module that LoRA can adapt, in registration order
    (the order PEFT nests its wrappers in)."""
    return [
        name
        for name, parameter in module.named_parameters(recurse=False)
        if name in EXPERT_WEIGHTS and parameter.dim() == 3
    ]


def expert_shape(module: nn.Module, weight: str) -> tuple[int, int, int]:
    """(experts, out, in) of a stacked weight, whatever its layout."""
    experts, first, second = getattr(module, weight).shape
    return (experts, second, first) if module.is_transposed else (experts, first, second)


class ExpertsFactors(LoraFactors):
    """One adapter's factors on one stacked weight: ``A`` (E, r, in), ``B`` (E, out, r);
    ``ΔW = s · B A`` is (E, out, in), one product per expert."""

    @staticmethod
    def rank_of(tensors: Mapping[str, Tensor]) -> int:
        return tensors["A"].shape[1]

    @staticmethod
    def matrix_shape(tensors: Mapping[str, Tensor]) -> tuple[int, int]:
        return tensors["B"].shape[1], tensors["A"].shape[2]


class LoraExperts(LoraLayer):
    """LoRA on one stacked weight (``weight``) of an experts module, or of the wrapper
    that adapts another of its weights."""

    factors_class = ExpertsFactors

    def __init__(self, base_layer: nn.Module, weight: str) -> None:
        super().__init__(base_layer)
        self.weight_name = weight

    @property
    def original(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraExperts):
            module = module.base_layer
        return module

    def parameter(self) -> nn.Parameter:
        return getattr(self.original, self.weight_name)

    def chain(self) -> list[LoraExperts]:
        """This wrapper and the ones inside it, outermost first."""
        layers: list[LoraExperts] = [self]
        while isinstance(layers[-1].base_layer, LoraExperts):
            layers.append(layers[-1].base_layer)
        return layers

    # -- geometry ----------------------------------------------------------------------

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        experts, out, inputs = expert_shape(self.original, self.weight_name)
        return (experts, r, inputs), (experts, out, r)

    def max_rank(self) -> int:
        return min(expert_shape(self.original, self.weight_name)[1:])

    def a_matrices(self, factors: LoraFactors) -> list[Tensor]:
        return list(factors.A.unbind(0))  # each expert's A, with its own fan-in

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.transpose(1, 2) if self.original.is_transposed else delta

    def stored_weight(self) -> Tensor:
        return self.parameter()

    def add_to_weight(self, delta: Tensor) -> None:
        bases.add_into(self.parameter(), delta)

    def fixed_reason(self) -> str | None:
        return None

    def factor_place(self) -> tuple[torch.device, torch.dtype]:
        weight = self.parameter()
        return weight.device, bases.factor_dtype_for(weight.dtype)

    @property
    def fan_in_fan_out(self) -> bool:
        return False  # PEFT reads the layout from the module's is_transposed

    # -- PEFT's layout -----------------------------------------------------------------

    def to_peft(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        A, B = tensors["A"], tensors["B"]
        experts, out, r = B.shape
        return {
            "A": A.reshape(experts * r, A.shape[2]),  # row e·r + k
            "B": B.permute(1, 2, 0).reshape(out, r * experts),  # column k·E + e
        }

    def from_peft(self, tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        experts = expert_shape(self.original, self.weight_name)[0]
        A, B = tensors["A"], tensors["B"]
        r = A.shape[0] // experts
        return {
            "A": A.reshape(experts, r, A.shape[1]),
            "B": B.reshape(B.shape[0], r, experts).permute(2, 0, 1),
        }

    # -- the forward -------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        experts = self.original
        updates = {
            layer.weight_name: layer.lora[layer.active_adapter]
            for layer in self.chain()
            if layer.active_adapter is not None and layer.active_adapter not in layer.merged
        }
        if not updates:
            return experts(hidden_states, *args, **kwargs)
        bound = _signature(type(experts)).bind(experts, hidden_states, *args, **kwargs)
        _, _, indices, weights = list(bound.arguments.values())[:4]
        return experts_forward(experts, hidden_states, indices, weights, updates)

    def extra_repr(self) -> str:
        return f"weight={self.weight_name!r}, {super().extra_repr()}"


@functools.cache
def _signature(experts_class: type) -> inspect.Signature:
    """The experts' forward signature (self first), read once per class, not per call:
    routes arrive positionally (Transformers' blocks) or by gpt-oss's keywords."""
    return inspect.signature(experts_class.forward)


def outer_name(layer_name: str) -> str:
    """The experts module's own name from the name of any of its nested wrappers
    (``…mlp.experts.base_layer`` → ``…mlp.experts``)."""
    while layer_name.endswith(".base_layer"):
        layer_name = layer_name.removesuffix(".base_layer")
    return layer_name


def experts_forward(
    experts: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    updates: Mapping[str, LoraFactors],
) -> Tensor:
    """The experts' output (tokens, hidden) for the routed tokens, each adapted weight
    with its expert's low-rank update, with the module's own gate, activation, biases and
    layout. The (token, choice) pairs are sorted by expert once, so that each expert reads
    one contiguous run of them (as Transformers' grouped kernel does): one gather of the
    inputs, the gate over all pairs at once, and one scatter back, however many experts."""
    count = experts.num_experts
    choices = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    with torch.no_grad():
        order = torch.argsort(flat, stable=True)
        sizes = torch.bincount(flat.clamp(0, count), minlength=count + 1)[:count].tolist()
    order = order[: sum(sizes)]  # ids beyond the experts (expert parallelism's sentinel) last
    token = order // choices
    x = hidden_states[token]
    runs = [(e, size) for e, size in enumerate(sizes) if size]
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    h = _project_runs(experts, first, x, runs, updates)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = _project_runs(experts, "down_proj", h, runs, updates)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order, None]
    out = torch.zeros_like(hidden_states)
    return out.index_add_(0, token, y.to(out.dtype))


def _project_runs(
    experts: nn.Module,
    name: str,
    x: Tensor,
    runs: list[tuple[int, int]],
    updates: Mapping[str, LoraFactors],
) -> Tensor:
    """Each run of pairs through its expert's weight ``name`` (and update)."""
    parts, start = [], 0
    for expert, size in runs:
        parts.append(_project(experts, name, expert, x[start : start + size], updates))
        start += size
    return torch.cat(parts)


def _project(
    experts: nn.Module, name: str, expert: int, x: Tensor, updates: Mapping[str, LoraFactors]
) -> Tensor:
    """``x`` through expert ``expert``'s weight ``name``, its bias, and its update."""
    weight = getattr(experts, name)[expert]
    y = x @ weight if experts.is_transposed else F.linear(x, weight)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[expert]
    factors = updates.get(name)
    if factors is not None:
        lora_x = factors.dropout(x.to(factors.A.dtype))
        delta = (lora_x @ factors.A[expert].T) @ factors.B[expert].T
        y = y + (delta * factors.scale).to(y.dtype)
    return y


__all__ = [
    "EXPERT_WEIGHTS",
    "SHORT_NAMES",
    "ExpertsFactors",
    "LoraExperts",
    "expert_shape",
    "experts_forward",
    "is_experts",
    "outer_name",
    "stacked_weights",
]
