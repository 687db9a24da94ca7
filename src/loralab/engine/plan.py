"""The tensors a fast decoding step reads, taken from the model once: each layer's base
weights (the model's own tensors, no copies), its norms, and the LoRA updates of the
projections that share an input gathered into one low-rank product per group.

q, k and v read the same normed hidden state, and so do gate and up: their adapters'
``A`` matrices are stacked into one (Σr, in) matrix and their scaled ``Bᵀ`` into one
block matrix (Σr, Σout), so a group's whole update is two small products instead of two
per projection, plus the scale and the addition (a step at one row is mostly such small
operations). The base weights stay apart: fusing them would copy two thirds of every
layer's weights for a gain measured below 2% (``benchmarks/bench_engine_step.py``).

A plan is for one set of rows: every row the same adapter (the layers' active one, or
none), or each row its own (``row_adapters``), whose stacked factors are gathered once,
when the rows change, and become inputs of the step, so that a new mix of adapters is
new data, not new code.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.layers import LoraFactors, LoraLayer, LoraLinear
from .weights import Packed, packed

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The projections that share an input, in the order their outputs are split.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass
class LowRank:
    """A group's update ``x Aᵀ Bᵀ`` (scales folded into ``Bt``): ``A`` (Σr, in) and ``Bt``
    (Σr, Σout) for every row alike, or (rows, Σr, in) and (rows, Σr, Σout) per row."""

    A: Tensor
    Bt: Tensor

    @property
    def per_row(self) -> bool:
        return self.A.dim() == 3


@dataclass
class Group:
    """Projections that read one input: their base weights and biases, their output
    widths, the group's update (None: no row adapts any of them), and the base weights
    fused in bf16 or int8 when the engine runs those (``weights.py``; None: the model's own)."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor | None, ...]
    widths: tuple[int, ...]
    update: LowRank | None
    packed: Packed | None = None


@dataclass
class LayerPlan:
    input_norm: tuple[Tensor, float]
    post_norm: tuple[Tensor, float]
    head_norms: tuple[tuple[Tensor, float], tuple[Tensor, float]] | None  # Qwen3's q, k
    qkv: Group
    o: Group
    gate_up: Group
    down: Group
    head_dim: int
    scaling: float
    act: nn.Module
    window: int | None


def fast_reason(model: nn.Module, row_adapters: Sequence[str | None] | None = None) -> str | None:
    """Why the fast step cannot run ``model`` (None: it can); the engine then runs the
    model's own modules. It needs each projection to be a plain ``nn.Linear`` (an fp32,
    bf16 or fp16 weight, not packed), bare or under a LoRA layer whose adapters are plain
    LoRA factors, and nothing else (hooks, bottleneck adapters) inside the layers."""
    for index, layer in enumerate(model.model.layers):
        reason = _layer_reason(layer, row_adapters)
        if reason is not None:
            return f"layer {index}: {reason}"
    if row_adapters is not None:
        ends = {"embed_tokens": model.model.embed_tokens, "lm_head": model.lm_head}
        for name, module in ends.items():
            if isinstance(module, LoraLayer):
                return f"{name} has an adapter, which the fast step does not mix per row"
    return None


def _layer_reason(layer: nn.Module, row_adapters) -> str | None:
    own = [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
    for part in own:
        if not _transformers_module(part):
            return f"its {type(part).__name__} is not Transformers' own"
    parts = list(own)  # the modules the step reads (not the adapters' factors)
    for name in (*ATTENTION, *MLP):
        module = _projection(layer, name)
        parts += [module, module.base_layer] if isinstance(module, LoraLayer) else [module]
    if any(module._forward_hooks or module._forward_pre_hooks for module in parts):
        return "a hook runs inside it (per-row mixing, or a user's)"
    for name in (*ATTENTION, *MLP):
        reason = _projection_reason(_projection(layer, name), row_adapters)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def _transformers_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _projection(layer: nn.Module, name: str) -> nn.Module:
    return getattr(layer.self_attn if name in ATTENTION else layer.mlp, name)


def _projection_reason(module: nn.Module, row_adapters) -> str | None:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if type(base) is not nn.Linear or not base.weight.is_floating_point():
        return f"its base is a {type(base).__name__}, not a plain float nn.Linear"
    if not isinstance(module, LoraLayer):
        return None
    if type(module) is not LoraLinear:
        return f"a {type(module).__name__}; the fast step reads plain LoRA layers only"
    if row_adapters is not None:
        used = set(row_adapters) & set(module.lora)
    else:
        used = {module.active_adapter} - {None}
    for name in used:
        if name in module.merged and row_adapters is not None:
            return f"adapter {name!r} is merged (it would apply to every row)"
        if type(module.lora[name]) is not LoraFactors:
            return f"adapter {name!r} is a {type(module.lora[name]).__name__}, not plain LoRA"
        if row_adapters is not None and name in module.rewrote:
            return f"adapter {name!r} rewrote the base weight, which every row would use"
    return None


def build(
    model: nn.Module,
    row_adapters: Sequence[str | None] | None = None,
    trust: bool = False,
    weights: str = "fp32",
) -> list[LayerPlan]:
    """The plan of every layer, for rows that all run the layers' active adapter (None)
    or each its own (``row_adapters[i]``; None there: the bare base). ``fast_reason``
    must have returned None. ``trust``: reuse each group's bank of factors without
    checking them (only for a caller that knows no adapter changed since its last
    checked build: the server, whose adapters change only between its steps).
    ``weights``: ``fp32`` (the model's own), ``bf16`` or ``int8`` (``weights.choose``'s)."""
    plans = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        groups = [_group(layer, names, row_adapters, trust, weights) for names in GROUPS]
        head_norms = None
        if hasattr(attention, "q_norm"):
            head_norms = (_norm(attention.q_norm), _norm(attention.k_norm))
        plans.append(
            LayerPlan(
                _norm(layer.input_layernorm),
                _norm(layer.post_attention_layernorm),
                head_norms,
                *groups,
                head_dim=attention.head_dim,
                scaling=attention.scaling,
                act=layer.mlp.act_fn,
                window=window_of(model.config, index),
            )
        )
    return plans


def _norm(module: nn.Module) -> tuple[Tensor, float]:
    return module.weight, module.variance_epsilon


def window_of(config, index: int) -> int | None:
    """The sliding window of layer ``index`` (None: it attends over every earlier key)."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return config.sliding_window if kinds[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _group(
    layer: nn.Module, names: tuple[str, ...], row_adapters, trust: bool, weights: str
) -> Group:
    modules = [_projection(layer, name) for name in names]
    bases = [m.base_layer if isinstance(m, LoraLayer) else m for m in modules]
    widths = tuple(base.out_features for base in bases)
    if row_adapters is None:
        update = _shared_update(modules, widths)
    else:
        update = _row_update(modules, widths, list(row_adapters), trust)
    group = Group(tuple(b.weight for b in bases), tuple(b.bias for b in bases), widths, update)
    if weights in ("bf16", "int8"):
        group.packed = packed(bases[0], list(group.weights), list(group.biases), weights)
    return group


def head(model: nn.Module, weights: str) -> Packed | None:
    """The output head in bf16 (or int8) when the engine runs such weights and the head
    is a plain ``nn.Linear`` (an adapter on it runs in its own module), else None."""
    module = model.lm_head
    if weights not in ("bf16", "int8") or type(module) is not nn.Linear:
        return None
    return packed(module, [module.weight], [module.bias], weights)


def _active_factors(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The module's unmerged active adapter as (A, scaled B), or None."""
    if not isinstance(module, LoraLayer):
        return None
    name = module.active_adapter
    if name is None or name in module.merged:
        return None
    return module.lora[name].low_rank()


def _shared_update(modules: list[nn.Module], widths: tuple[int, ...]) -> LowRank | None:
    pairs = [_active_factors(m) for m in modules]
    if all(pair is None for pair in pairs):
        return None
    return _stacked(pairs, widths)


def _stacked(pairs: list[tuple[Tensor, Tensor] | None], widths: tuple[int, ...]) -> LowRank:
    """One group's A (Σr, in) and block Bᵀ (Σr, Σout) from each module's (A, scaled B)."""
    As, Bts = [], []
    offset, total = 0, sum(widths)
    for pair, width in zip(pairs, widths, strict=True):
        if pair is not None:
            A, B = pair
            As.append(A.detach())
            Bts.append(F.pad(B.detach().T, (offset, total - offset - width)))
        offset += width
    return LowRank(torch.cat(As), torch.cat(Bts))


# Per layer group: the bank of every adapter on it (each adapter's stacked group factors,
# ranks padded to the largest, entry 0 the bare base's zeros), rebuilt only when its
# adapters or their tensors change (version counters: hot-swaps, optimizer steps; the
# factors themselves: an adapter deleted and loaded again). Any mix of rows is then one
# ``index_select`` per tensor, whatever rows asked for before.
_BANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row_update(
    modules: list[nn.Module], widths: tuple[int, ...], rows: list[str | None], trust: bool
) -> LowRank | None:
    cached = _BANKS.get(modules[0]) if trust else None
    if cached is not None:
        names, bank = cached[0][0], cached[1]
    else:
        names = tuple(sorted({n for m in modules if isinstance(m, LoraLayer) for n in m.lora}))
        bank = _bank(modules, widths, names)
    if not {r for r in rows if r is not None} & set(names):
        return None  # no row adapts this group
    if bank is None:
        return None
    where = {name: i + 1 for i, name in enumerate(names)}
    index = torch.tensor([where.get(r, 0) for r in rows], device=bank.A.device)
    return LowRank(bank.A.index_select(0, index), bank.Bt.index_select(0, index))


def _bank(modules: list[nn.Module], widths: tuple[int, ...], names: tuple[str, ...]):
    factors = [
        [m.lora[n] if isinstance(m, LoraLayer) and n in m.lora else None for m in modules]
        for n in names
    ]
    held = [f for group in factors for f in group if f is not None]
    # the factors by identity (the entry holds them, so no id is reused while it lives)
    # and their tensors' version counters
    key = (names, tuple((id(f), f.A._version, f.B._version, f.scale) for f in held))
    cached = _BANKS.get(modules[0])
    if cached is not None and cached[0] == key:
        return cached[1]
    stacks = [
        None
        if all(f is None for f in group)
        else _stacked([None if f is None else f.low_rank() for f in group], widths)
        for group in factors
    ]
    present = [stack for stack in stacks if stack is not None]
    bank = None
    if present:
        rank = max(stack.A.shape[0] for stack in present)
        A0, Bt0 = present[0].A, present[0].Bt
        As = [A0.new_zeros(rank, A0.shape[1])]  # the bare base
        Bts = [Bt0.new_zeros(rank, Bt0.shape[1])]
        for stack in stacks:
            if stack is None:  # an adapter without this group: zeros, as the base
                As.append(As[0])
                Bts.append(Bts[0])
                continue
            pad = rank - stack.A.shape[0]  # zero rows change no product
            As.append(F.pad(stack.A, (0, 0, 0, pad)))
            Bts.append(F.pad(stack.Bt, (0, 0, 0, pad)))
        bank = LowRank(torch.stack(As), torch.stack(Bts))
    _BANKS[modules[0]] = (key, bank, held)
    return bank
