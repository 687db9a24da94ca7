"""The causal-LM training loss, computed only where it counts.

A causal LM's forward computes the output head at every position: (B, T, vocab) logits,
which on SmolLM2 (vocab 49,152) at 8 × 64 tokens is 100 MB, kept for the backward pass
with its log-softmax and then its gradient, while the loss counts only the positions whose
next token is a completion token. ``causal_lm_loss`` runs the model with its output head
set aside, keeps the hidden states of the counted positions, and applies the head and
the cross-entropy to them in chunks, computing each chunk's gradient right away
(``LinearCrossEntropy``): no tensor of more than one chunk's logits ever exists. The value
is the model's own loss (the mean over counted tokens) up to rounding, and so is the
gradient.

It applies to the model families whose forward is "logits = lm_head(hidden)" with nothing
after the head (``PLAIN_HEAD_MODELS``) and a plain ``nn.Linear`` head (frozen, or trained
in full, or a frozen packed one); anything else, and every classifier, gets the model's own
loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.quantized import PackedLinear

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits of one chunk: 8M floats (32 MB in fp32)
NORMALISER_ROWS = 16  # rows of a chunk whose log-normaliser is computed at once

# Transformers model types whose logits are exactly lm_head(final hidden states): no soft
# capping (Gemma 2), logit scale (Cohere) or divisor (Granite) after the head.
PLAIN_HEAD_MODELS = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2", "gpt_neox"}
)


def counted_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, head) of a causal LM whose loss ``causal_lm_loss`` can compute,
    or None: another kind of model, or a head it cannot apply in chunks itself."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) not in (nn.Linear, PackedLinear):  # a LoRA-wrapped or changed head
        return None
    for module in model.modules():
        for attribute, child in module.named_children():
            if child is head:
                return module, attribute, head
    return None


@contextlib.contextmanager
def head_set_aside(parent: nn.Module, attribute: str) -> Iterator[None]:
    """The model's forward returns its final hidden states as ``logits`` inside the block."""
    head = getattr(parent, attribute)
    setattr(parent, attribute, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attribute, head)


def causal_lm_loss(
    runner: nn.Module, model: nn.Module, batch: dict[str, Tensor], chunk: int | None = None
) -> Tensor:
    """The mean loss per counted token of ``batch`` (as ``runner(**batch).loss``).

    ``runner`` is what runs the forward (the model, or DDP's wrapper of it); ``model`` is
    the model itself. Falls back to the model's own loss where ``counted_head`` says so.
    """
    found = counted_head(model)
    labels = batch.get("labels")
    if found is None or labels is None or labels.dim() != 2:
        return runner(**batch).loss
    parent, attribute, head = found
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with head_set_aside(parent, attribute):
        hidden = runner(**inputs).logits  # (B, T, d): the head's input
    targets = labels[:, 1:]  # position t predicts token t + 1
    counted = targets != IGNORE_INDEX  # (B, T - 1)
    selected = hidden[:, :-1][counted]  # (N, d)
    # A packed head is unpacked for the loss alone (frozen: nothing of it is saved).
    weight = head.dequantized() if isinstance(head, PackedLinear) else head.weight
    total = LinearCrossEntropy.apply(
        selected, weight, head.bias, targets[counted], chunk or chunk_size(head)
    )
    return total / counted.sum()  # 0 / 0 = nan for a batch with nothing to count, as Transformers


def chunk_size(head: nn.Linear) -> int:
    return max(1, CHUNK_ELEMENTS // head.out_features)


def row_logsumexp(logits: Tensor, rows: int = NORMALISER_ROWS) -> Tensor:
    """``torch.logsumexp(logits, dim=-1)`` of a (C, V) tensor, ``rows`` rows at a time.

    ``logsumexp`` builds ``exp(logits − max)`` in full before it sums it: a second chunk of
    logits (32 MB on SmolLM2) at the moment a training step's memory peaks. A block of rows
    needs a block of that. The values are the same to the last bit: a reduction over the
    last dimension of two rows or more splits its work by rows, so each row is summed by
    the same code in the same order; a lone row is summed in two halves instead, so no
    block is left with one row unless the whole tensor has one.
    """
    count = logits.shape[0]
    if count <= rows + 1:
        return torch.logsumexp(logits, dim=-1)
    starts = list(range(0, count, rows))
    if count - starts[-1] == 1:
        starts.pop()  # the last block takes the lone row: rows + 1 of them
    ends = [*starts[1:], count]
    blocks = zip(starts, ends, strict=True)
    return torch.cat([torch.logsumexp(logits[a:b], dim=-1) for a, b in blocks])


class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(hidden @ Wᵀ + b, targets) over N rows, ``chunk`` rows at a time.

    Each chunk's gradients are computed in the forward pass, while its logits exist:
    ∂/∂logits = softmax − one-hot, so ∂hidden = that @ W, ∂W += thatᵀ @ hidden and ∂b +=
    its column sums. The backward pass only scales them by the incoming gradient, so the
    work is the plain computation's (one product forward, one or two back) and the
    memory is one chunk of logits and the (N, d) gradient of the hidden states.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # (N, d), (V, d), (V,), (N,)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if want_bias and bias is not None else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            # The last chunk's logits (which the three names hold) go before this chunk's
            # are made: otherwise two chunks of logits exist at the step's peak.
            logits = probabilities = grad_logits = None
            rows = hidden[start : start + chunk]
            wanted = targets[start : start + chunk]
            logits = F.linear(rows, weight, bias).float()  # (C, V)
            log_normaliser = row_logsumexp(logits)  # (C,)
            picked = logits.gather(1, wanted.unsqueeze(1)).squeeze(1)
            total += (log_normaliser - picked).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            probabilities = logits.sub_(log_normaliser.unsqueeze(1)).exp_()  # in place
            probabilities[torch.arange(len(wanted), device=logits.device), wanted] -= 1
            grad_logits = probabilities.to(weight.dtype)  # ∂ Σ loss / ∂ logits, (C, V)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T.float() @ rows.float()
            if grad_bias is not None:
                grad_bias += probabilities.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.present = tuple(g is not None for g in (grad_hidden, grad_weight, grad_bias))
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if present else None for present in ctx.present]
        return *grads, None, None


__all__ = [
    "PLAIN_HEAD_MODELS",
    "LinearCrossEntropy",
    "causal_lm_loss",
    "counted_head",
    "row_logsumexp",
]
