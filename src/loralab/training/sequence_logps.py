"""log π(y | x) of each row's counted tokens: what the preference losses compare.

Like the training loss (``loss.py``), the output head runs only at the counted positions,
in chunks, so the (rows, length, vocab) logits are never built. Each chunk's gradient with
respect to the hidden states is computed while its logits exist (``TokenLogProbs``): a
token's log-probability has ∂/∂logits = one-hot − softmax, and the backward pass scales
each row of that by the gradient the loss gives its token. That needs a frozen head (it
is under LoRA); a head that trains, or a model whose logits are not ``lm_head(hidden)``,
gets the model's own logits and a log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.quantized import PackedLinear
from .loss import IGNORE_INDEX, chunk_size, counted_head, head_set_aside, row_logsumexp


@dataclass
class RowLogProbs:
    """Per row of a batch: the sum of its counted tokens' log-probabilities, and how many
    tokens were counted."""

    total: Tensor  # (R,)
    tokens: Tensor  # (R,), float

    @property
    def mean(self) -> Tensor:
        """The average log-probability per counted token (SimPO's and ORPO's length
        normalisation)."""
        return self.total / self.tokens.clamp(min=1)


def row_log_probs(runner: nn.Module, model: nn.Module, batch: dict[str, Tensor]) -> RowLogProbs:
    """Each row's Σ log p(token | tokens before it) over the tokens its labels count."""
    labels = batch["labels"]
    counted = labels[:, 1:] != IGNORE_INDEX  # (R, T - 1)
    token = counted_log_probs(runner, model, batch)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(counted)
    total = torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device)
    total = total.index_add(0, rows[counted], token)
    return RowLogProbs(total, counted.sum(1).to(token.dtype))


def token_log_probs(
    runner: nn.Module, model: nn.Module, batch: dict[str, Tensor], temperature: float = 1.0
) -> Tensor:
    """(R, T − 1): log p(token t + 1 | tokens up to t) where the labels count it, 0
    elsewhere (GRPO's per-token ratios), under the logits divided by ``temperature``
    (the distribution the tokens were sampled from, as TRL's GRPO has it)."""
    labels = batch["labels"]
    counted = labels[:, 1:] != IGNORE_INDEX
    token = counted_log_probs(runner, model, batch, temperature)
    out = torch.zeros(counted.shape, dtype=token.dtype, device=token.device)
    return out.masked_scatter(counted, token)


def counted_log_probs(
    runner: nn.Module, model: nn.Module, batch: dict[str, Tensor], temperature: float = 1.0
) -> Tensor:
    """(N,): the log-probability of each counted token, in row-major order (the logits
    divided by ``temperature``)."""
    labels = batch["labels"]
    targets = labels[:, 1:]  # position t predicts token t + 1
    counted = targets != IGNORE_INDEX  # (R, T - 1)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    found = counted_head(model)
    head = found[2] if found else None
    trains = head is not None and any(p.requires_grad for p in head.parameters())
    if found is None or trains:
        logits = runner(**inputs).logits[:, :-1]  # (R, T - 1, V)
        picked = (logits[counted].float() / temperature).log_softmax(-1)  # (N, V)
        token = picked.gather(1, targets[counted].unsqueeze(1)).squeeze(1)  # (N,)
    else:
        parent, attribute, head = found
        with head_set_aside(parent, attribute):
            hidden = runner(**inputs).logits[:, :-1]  # (R, T - 1, d): the head's input
        weight = head.dequantized() if isinstance(head, PackedLinear) else head.weight
        bias = _detached(head.bias)
        chunk = chunk_size(head)
        token = TokenLogProbs.apply(
            hidden[counted], weight.detach(), bias, targets[counted], chunk, 1 / temperature
        )
    return token


def _detached(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach()


class TokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ Wᵀ + b)[target] for N rows, ``chunk`` rows at a time, with W
    and b frozen: each row's ∂/∂hidden = (one-hot − softmax) @ W is kept (N × d, the size
    of the hidden states) instead of its logits (N × vocab)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale=1.0):  # (N, d), (V, d), (V,), (N,)
        values = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            logits = None  # the last chunk's logits go before this chunk's are made
            wanted = targets[start : start + chunk]
            logits = F.linear(hidden[start : start + chunk], weight, bias).float()  # (C, V)
            if scale != 1.0:  # a temperature: the tempered distribution's probabilities
                logits = logits.mul_(scale)
            log_normaliser = row_logsumexp(logits)
            values[start : start + chunk] = (
                logits.gather(1, wanted.unsqueeze(1)).squeeze(1) - log_normaliser
            )
            if grad_rows is None:
                continue
            probabilities = logits.sub_(log_normaliser.unsqueeze(1)).exp_().neg_()  # −softmax
            probabilities[torch.arange(len(wanted), device=logits.device), wanted] += 1
            grad_rows[start : start + chunk] = probabilities.to(weight.dtype) @ weight * scale
        ctx.save_for_backward(*(() if grad_rows is None else (grad_rows,)))
        return values

    @staticmethod
    def backward(ctx, grad_values):  # (N,)
        if not ctx.saved_tensors:
            return None, None, None, None, None, None
        (grad_rows,) = ctx.saved_tensors
        grad_hidden = grad_rows * grad_values.unsqueeze(1).to(grad_rows.dtype)
        return grad_hidden, None, None, None, None, None


__all__ = ["RowLogProbs", "TokenLogProbs", "counted_log_probs", "row_log_probs", "token_log_probs"]
