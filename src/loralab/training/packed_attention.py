"""Attention that stays within each example of a packed row.

A packed batch (``data/packing.py``) gives the model ``position_ids`` that restart at
each example and no 2-D attention mask. Transformers' mask builder reads the restarts as
packed sequences and makes the attention block-diagonal: a 4-D mask for SDPA and eager
attention (the CPU's). Not every path honours them (FlashAttention's variable-length
kernels only for a batch of one row, in Transformers 5), and a model that ignored them
would attend across examples and train on nonsense without a sign, so a run checks the
model once before its first step, called as training calls it: the same tokens packed
twice, in a batch of two rows, must give the same logits twice in each row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora.config import ConfigError

PROBE_IDS = (11, 7, 5, 3)  # any tokens: the second copy must not see the first
RELATIVE_TOLERANCE = 1e-3  # of the largest logit, or 8 ulps of the logits' dtype


@torch.no_grad()
def check_packed_attention(model: nn.Module, options: dict | None = None) -> None:
    """Refuse ``packing`` for a model that attends across the examples of a packed row;
    ``options`` are the keyword arguments training passes (``use_cache=False``)."""
    was_training = model.training
    model.eval()
    length = len(PROBE_IDS)
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([PROBE_IDS * 2] * 2, device=device)
        positions = torch.arange(length, device=device).repeat(2, 2)
        try:
            logits = model(input_ids=ids, position_ids=positions, **(options or {})).logits
        except TypeError as error:  # a forward without position_ids
            raise ConfigError(
                f"packing: {type(model).__name__} does not take position_ids ({error}); "
                "train without --packing"
            ) from None
    finally:
        model.train(was_training)
    first, second = logits[:, :length].float(), logits[:, length:].float()
    gap = (first - second).abs().max().item()
    scale = first.abs().max().item()
    tolerance = max(RELATIVE_TOLERANCE, 8 * torch.finfo(logits.dtype).eps) * scale + 1e-6
    if not gap <= tolerance:
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise ConfigError(
            f"packing: {type(model).__name__} (attention {implementation!r}) attends across "
            f"the examples of a packed row (the same tokens gave logits {gap:.3g} apart); "
            "train without --packing"
        )
