"""One forward of the Llama family over the engine's KV cache: tokens at given positions in,
the final hidden states out, for a prompt's chunk and a decoding step alike.

It calls the model's own modules (norms, projections, MLP, rotary embedding) in
Transformers' order, so LoRA layers, unmerged adapters, per-row mixing and bottleneck
adapters run inside it unchanged, and the numbers are the model's own; what it replaces
is the rest of Transformers' forward: its cache object, its masks built for a whole
padded batch, and the Python around them. Each row attends over its own positions only
(keys at or before its query's position, within the sliding window where the model has
one), so rows need no left padding and every row may stand at a different position.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .plan import window_of
from .step import rotate, signed, visible

# Transformers' model types whose decoder layer is Llama's: pre-norm attention with q, k,
# v and o projections (Qwen3 adds per-head q and k norms), rotary positions, and a gated
# MLP, each under the same attribute names.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")

# Methods that add tokens or keys in Transformers' own forward, which the engine does not run.
PREFIX_METHODS = ("preembed", "prelayer", "lora-pe")


def supported_reason(model: nn.Module) -> str | None:
    """Why the engine cannot run ``model`` (None: it can); the caller falls back to
    Transformers' ``generate`` and says so."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        return f"the engine runs the Llama family ({', '.join(LLAMA_FAMILY)}), not {model_type!r}"
    if not hasattr(model, "model") or not hasattr(model, "lm_head"):
        return f"a {type(model).__name__} is not a causal LM with a head"
    from ..methods.method import applied_method  # the record only; no method runs here

    method = applied_method(model)
    if method is not None and method.name in PREFIX_METHODS:
        return f"{method.name}'s virtual tokens ride in Transformers' own forward"
    return None


def new_cache(model: nn.Module, rows: int, length: int) -> KVCache:
    """A cache for ``rows`` sequences of up to ``length`` positions of ``model``."""
    config = model.config
    head_dim = model.model.layers[0].self_attn.head_dim  # what the forward reshapes by
    embeddings = model.get_input_embeddings().weight
    return KVCache(
        config.num_hidden_layers,
        rows,
        config.num_key_value_heads,
        length,
        head_dim,
        embeddings.dtype,
        embeddings.device,
    )


def forward(
    model: nn.Module,
    cache: KVCache,
    tokens: Tensor,
    positions: Tensor,
    live: int | None = None,
    first: int = 0,
) -> Tensor:
    """Hidden states (R, T, hidden) after the final norm for ``tokens`` (R, T) at
    ``positions`` (R, T) of cache rows ``first`` … ``first + R − 1``; their keys and
    values are written into the cache first. Positions past a row's real tokens may hold
    anything: no query at or before them reads them, and the row's next tokens overwrite
    them. ``live``: the positions attended over (``cache.live_length`` of the last one,
    found when not given: a compiled step is given it, since reading a tensor's value
    breaks its graph)."""
    inner = model.model
    config = model.config
    hidden = inner.embed_tokens(tokens)
    cos, sin = inner.rotary_emb(hidden, positions)  # (R, T, head dim)
    cos, sin = cos.unsqueeze(1), signed(sin).unsqueeze(1)  # over the heads
    rows = tokens.shape[0]
    if live is None:
        live = cache.live_length(int(positions.max()))
    cache.ensure(live)  # what the layers read holds numbers
    masks: dict[int | None, Tensor] = {}
    slots = cache.slots(positions, first)
    for index, layer in enumerate(inner.layers):
        window = window_of(config, index)
        if window not in masks:
            masks[window] = visible(positions, live, window)
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        q, k, v = _projections(attention, normed)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache.write(index, k, v, slots)
        keys, values = cache.read(index, rows, live, first)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=masks[window], scale=attention.scaling, enable_gqa=True
        )  # (R, heads, T, head dim)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).flatten(2))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return inner.norm(hidden)


def _projections(attention: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (R, heads, T, d), k and v (R, kv heads, T, d), with Qwen3's per-head norms."""
    shape = (*x.shape[:-1], -1, attention.head_dim)
    q = attention.q_proj(x).view(shape)
    k = attention.k_proj(x).view(shape)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    v = attention.v_proj(x).view(shape)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
