"""The fast forward of the Llama family: the model's tensors, read through a plan
(``plan.py``), in Transformers' order of operations, with no module calls inside the
layers. Tokens at given positions in, the final hidden states out, for a prompt's chunk
and a decoding step alike; the keys and values go into the engine's cache.

What it saves over calling the modules is the Python and the small operations around
each product: a LoRA layer's forward is five operations per projection (the base, A, B,
the scale, the addition), here a group of projections that share an input is two small
products and one ``addmm`` per projection, whose accumulation adds the base product
onto the update in place. On a step at one row that is most of the difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .plan import Group, LayerPlan, LowRank
from .weights import Packed, linear


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
    inner = model.model
    hidden = inner.embed_tokens(tokens)
    cos, sin = rotary[0][positions].unsqueeze(1), rotary[1][positions].unsqueeze(1)
    rows, count = tokens.shape
    if live is None:
        live = cache.live_length(int(positions.max()))
    masks: dict[int | None, Tensor] = {}
    slots = cache.slots(positions, first)
    for index, plan in enumerate(plans):
        if plan.window not in masks:
            masks[plan.window] = visible(positions, live, plan.window)
        flat = _rms(hidden, plan.input_norm).view(rows * count, -1)
        q, k, v = _project(flat, plan.qkv, rows)
        q = q.view(rows, count, -1, plan.head_dim)
        k = k.view(rows, count, -1, plan.head_dim)
        if plan.head_norms is not None:
            q, k = _rms(q, plan.head_norms[0]), _rms(k, plan.head_norms[1])
        q = rotate(q.transpose(1, 2), cos, sin)
        k = rotate(k.transpose(1, 2), cos, sin)
        v = v.view(rows, count, -1, plan.head_dim).transpose(1, 2)
        cache.write(index, k, v, slots)
        keys, values = cache.read(index, rows, live, first)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=masks[plan.window], scale=plan.scaling, enable_gqa=True
        )  # (R, heads, T, head dim)
        (attended,) = _project(out.transpose(1, 2).reshape(rows * count, -1), plan.o, rows)
        hidden = hidden + attended.view(rows, count, -1)
        flat = _rms(hidden, plan.post_norm).view(rows * count, -1)
        gate, up = _project(flat, plan.gate_up, rows)
        (down,) = _project(plan.act(gate) * up, plan.down, rows)
        hidden = hidden + down.view(rows, count, -1)
    return inner.norm(hidden)


def rotary_tables(model: nn.Module, length: int) -> tuple[Tensor, Tensor]:
    """cos and signed sin (``signed``; length, head dim) of positions 0 … length − 1, from
    the model's own rotary embedding (its scaling included): each position's values are
    those it computes for that position alone."""
    embeddings = model.get_input_embeddings().weight
    positions = torch.arange(length, device=embeddings.device)[None]
    cos, sin = model.model.rotary_emb(embeddings[:1, None], positions)
    return cos[0], signed(sin[0])


def _project(x: Tensor, group: Group, rows: int) -> list[Tensor]:
    """Each projection of the group applied to ``x`` (R·T, in), with the group's update."""
    update = group.update
    if group.packed is not None:  # bf16 weights: one fused product, the update added on
        out = linear(x, group.packed)
        if update is not None:
            out = out + _delta(x, update, rows).to(out.dtype)
        return list(out.split(group.widths, dim=-1))
    if update is None:
        return [F.linear(x, w, b) for w, b in zip(group.weights, group.biases, strict=True)]
    delta = _delta(x, update, rows)
    outs, offset = [], 0
    for weight, bias, width in zip(group.weights, group.biases, group.widths, strict=True):
        part = delta[:, offset : offset + width]
        offset += width
        if part.dtype != x.dtype:  # as the LoRA layer adds it: onto the rounded base output
            outs.append(F.linear(x, weight, bias) + part.to(x.dtype))
            continue
        if bias is not None:
            part = part + bias
        outs.append(torch.addmm(part, x, weight.T))  # the base product accumulates onto it
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
    """The output head's logits of ``hidden``: the model's ``lm_head``, or its bf16 copy."""
    return model.lm_head(hidden) if packed is None else linear(hidden, packed)


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
