"""The fast forward of the Llama family: the model's tensors, read through a plan
(``plan.py``), in Transformers' order of operations, with no module calls inside the
layers. Tokens at given positions in, the final hidden states out, for a prompt's chunk
and a decoding step alike; the keys and values go into the engine's cache. Several sets
of rows (``Span``s: a step's rows and a prompt's chunk, each with its own cache and
updates) may share one forward, whose products read each base weight once for all.

What it saves over calling the modules is the Python and the small operations around
each product: a LoRA layer's forward is five operations per projection (the base, A, B,
the scale, the addition), here a group of projections that share an input is two small
products and one ``addmm`` per projection, whose accumulation adds the base product
onto the update in place. On a step at one row that is most of the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.inject import plain_head
from . import products
from .cache import KVCache
from .plan import Group, LayerPlan, LowRank
from .weights import Packed, linear


@dataclass
class Span:
    """Rows of one cache in a forward: ``tokens`` (R, T) at ``positions`` (R, T) of cache
    rows ``first`` … ``first + R − 1``, through ``layers`` (their plans: the updates these
    rows run); ``rotary``: that cache's tables (``rotary_tables``); ``live``: the positions
    attended over (found from ``positions`` when None)."""

    layers: list[LayerPlan]
    cache: KVCache
    tokens: Tensor
    positions: Tensor
    rotary: tuple[Tensor, Tensor]
    live: int | None = None
    first: int = 0


def forward(
    model: nn.Module,
    plans: list[LayerPlan],
    cache: KVCache,
    tokens: Tensor,
    positions: Tensor,
    rotary: tuple[Tensor, Tensor],
    live: int | None = None,
    first: int = 0,
) -> Tensor:
    """Hidden states (R, T, hidden) after the final norm for ``tokens`` (R, T) at
    ``positions`` (R, T) of cache rows ``first`` … ``first + R − 1`` (as ``llama.forward``);
    ``rotary``: the cos and sin tables of every cache position (``rotary_tables``)."""
    return forward_spans(model, [Span(plans, cache, tokens, positions, rotary, live, first)])[0]


def forward_spans(model: nn.Module, spans: list[Span]) -> list[Tensor]:
    """Each span's hidden states (R, T, hidden) from one forward: every span's tokens go
    through each base weight in one product (the server's decoding rows and a prompt's
    chunk read the weights once, not twice), while each span keeps its own updates, cache
    and attention. The spans' plans must come from the same model."""
    inner = model.model
    bounds, offset = [], 0
    for span in spans:
        count = span.tokens.numel()
        bounds.append((offset, offset + count, span.tokens.shape[0]))
        offset += count
    ids = spans[0].tokens if len(spans) == 1 else torch.cat([s.tokens.flatten() for s in spans])
    hidden = inner.embed_tokens(ids.reshape(-1))  # (N, hidden): every span's tokens
    prepared = [_prepare(span) for span in spans]
    for index in range(len(spans[0].layers)):
        plans = [span.layers[index] for span in spans]
        plan = plans[0]
        flat = _rms(hidden, plan.input_norm)
        q, k, v = _project(flat, [p.qkv for p in plans], bounds)
        attended = [
            _attend(plan, index, span, ready, q[a:b], k[a:b], v[a:b])
            for span, ready, (a, b, _) in zip(spans, prepared, bounds, strict=True)
        ]
        attended = attended[0] if len(attended) == 1 else torch.cat(attended)
        (out,) = _project(attended, [p.o for p in plans], bounds)
        hidden = hidden + out
        flat = _rms(hidden, plan.post_norm)
        gate, up = _project(flat, [p.gate_up for p in plans], bounds)
        (down,) = _project(plan.act(gate) * up, [p.down for p in plans], bounds)
        hidden = hidden + down
    hidden = inner.norm(hidden)
    pieces = zip(spans, bounds, strict=True)
    return [hidden[a:b].view(*span.tokens.shape, -1) for span, (a, b, _) in pieces]


@dataclass
class _Ready:
    """What a span's layers share: its rotary rows, live length, slots and masks."""

    cos: Tensor
    sin: Tensor
    live: int
    slots: Tensor
    masks: dict[int | None, Tensor]


def _prepare(span: Span) -> _Ready:
    positions = span.positions
    cos, sin = span.rotary[0][positions].unsqueeze(1), span.rotary[1][positions].unsqueeze(1)
    live = span.live
    if live is None:
        live = span.cache.live_length(int(positions.max()))
    span.cache.ensure(live)  # what the layers read holds numbers
    return _Ready(cos, sin, live, span.cache.slots(positions, span.first), {})


def _attend(
    plan: LayerPlan, index: int, span: Span, ready: _Ready, q: Tensor, k: Tensor, v: Tensor
) -> Tensor:
    """One span's attention in layer ``index``: its keys and values into its cache, its
    queries over its rows' live positions; (R·T, heads · head dim)."""
    rows, count = span.tokens.shape
    if plan.window not in ready.masks:
        ready.masks[plan.window] = visible(span.positions, ready.live, plan.window)
    q = q.view(rows, count, -1, plan.head_dim)
    k = k.view(rows, count, -1, plan.head_dim)
    if plan.head_norms is not None:
        q, k = _rms(q, plan.head_norms[0]), _rms(k, plan.head_norms[1])
    q = rotate(q.transpose(1, 2), ready.cos, ready.sin)
    k = rotate(k.transpose(1, 2), ready.cos, ready.sin)
    v = v.view(rows, count, -1, plan.head_dim).transpose(1, 2)
    span.cache.write(index, k, v, ready.slots)
    keys, values = span.cache.read(index, rows, ready.live, span.first)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=ready.masks[plan.window], scale=plan.scaling, enable_gqa=True
    )  # (R, heads, T, head dim)
    return out.transpose(1, 2).reshape(rows * count, -1)


def rotary_tables(model: nn.Module, length: int) -> tuple[Tensor, Tensor]:
    """cos and signed sin (``signed``; length, head dim) of positions 0 … length − 1, from
    the model's own rotary embedding (its scaling included): each position's values are
    those it computes for that position alone."""
    embeddings = model.get_input_embeddings().weight
    positions = torch.arange(length, device=embeddings.device)[None]
    cos, sin = model.model.rotary_emb(embeddings[:1, None], positions)
    return cos[0], signed(sin[0])


def _project(x: Tensor, groups: list[Group], bounds: list[tuple[int, int, int]]) -> list[Tensor]:
    """Each projection of the group applied to ``x`` (N, in), with each span's update on
    its tokens (``bounds``: each span's first and end token and its row count)."""
    if len(groups) == 1:
        return _project_one(x, groups[0], bounds[0][2])
    group = groups[0]  # the base weights: every span's are the model's own
    if group.packed is not None:
        outs = [linear(x, group.packed)]
        places = [(outs[0], 0, sum(group.widths))]
    else:
        outs = [products.linear(x, w, b) for w, b in zip(group.weights, group.biases, strict=True)]
        offsets = [sum(group.widths[:i]) for i in range(len(outs))]
        places = list(zip(outs, offsets, group.widths, strict=True))
    for each, (start, end, rows) in zip(groups, bounds, strict=True):
        if each.update is None:
            continue
        delta = _delta(x[start:end], each.update, rows)
        for out, offset, width in places:  # as the LoRA layer adds it: onto the base output
            out[start:end] += delta[:, offset : offset + width].to(out.dtype)
    return list(outs[0].split(group.widths, dim=-1)) if group.packed is not None else outs


def _project_one(x: Tensor, group: Group, rows: int) -> list[Tensor]:
    """``_project`` for one span."""
    update = group.update
    if group.packed is not None:  # bf16 or int8 weights: one fused product, the update added on
        out = linear(x, group.packed)
        if update is not None:
            out = out + _delta(x, update, rows).to(out.dtype)
        return list(out.split(group.widths, dim=-1))
    if update is None:
        return [products.linear(x, w, b) for w, b in zip(group.weights, group.biases, strict=True)]
    delta = _delta(x, update, rows)
    outs, offset = [], 0
    for weight, bias, width in zip(group.weights, group.biases, group.widths, strict=True):
        part = delta[:, offset : offset + width]
        offset += width
        if part.dtype != x.dtype:  # as the LoRA layer adds it: onto the rounded base output
            outs.append(products.linear(x, weight, bias) + part.to(x.dtype))
            continue
        if bias is not None:
            part = part + bias
        outs.append(products.linear(x, weight, onto=part))  # the base product accumulates onto it
    return outs


def _delta(x: Tensor, update: LowRank, rows: int) -> Tensor:
    """The group's update ``x Aᵀ Bᵀ`` (R·T, Σout), in the factors' dtype."""
    lora_x = x.to(update.A.dtype)  # a half-precision base feeds its fp32 factors in fp32
    if update.per_row:
        per_row = lora_x.view(rows, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(per_row, update.A.transpose(1, 2)), update.Bt)
        return delta.view(x.shape[0], -1)
    return (lora_x @ update.A.T) @ update.Bt


def head(model: nn.Module, packed: Packed | None, hidden: Tensor) -> Tensor:
    """The output head's logits of ``hidden``: the model's ``lm_head``, or its bf16 or int8 copy."""
    if packed is not None:
        return linear(hidden, packed)
    module = model.lm_head
    if plain_head(module):
        return products.linear(hidden, module.weight, module.bias)
    return module(hidden)


def _rms(x: Tensor, norm: tuple[Tensor, float]) -> Tensor:
    """Transformers' RMSNorm of the Llama family: in fp32, scaled in the input's dtype.
    On fp32 inputs PyTorch's fused ``rms_norm`` computes the same numbers (checked in
    the tests) in one operation instead of six."""
    weight, eps = norm
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary positions, as Transformers' Llama applies them: ``x·cos + (−x₂, x₁)·sin``,
    here with the halves swapped and the sign in the table (``signed``), one operation
    fewer and the same bits ((−a)·b and a·(−b) round alike)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


def signed(sin: Tensor) -> Tensor:
    """``sin`` with the first half of its last dimension negated (for ``rotate``)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def visible(positions: Tensor, live: int, window: int | None) -> Tensor:
    """Which of the first ``live`` cache positions each query sees: (R, 1, T, live)."""
    keys = torch.arange(live, device=positions.device)
    queries = positions[:, :, None]
    visible = keys <= queries
    if window is not None:
        visible &= keys > queries - window
    return visible[:, None]
