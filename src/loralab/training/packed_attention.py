"""Attention that stays within each example of a packed row.

A packed batch (``data/packing.py``) gives the model ``position_ids`` that restart at
each example and no 2-D attention mask. Transformers' mask builder reads the restarts as
packed sequences and makes the attention block-diagonal in every implementation: a 4-D
mask for SDPA and eager attention on the CPU, the variable-length kernels of
FlashAttention on a GPU. A model whose forward does not build its mask that way would
attend across examples and train on nonsense without a sign, so a run checks the model
once before its first step: the same tokens packed twice must give the same logits twice.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora.config import ConfigError

PROBE_IDS = (11, 7, 5, 3)  # any tokens: the second copy must not see the first
RELATIVE_TOLERANCE = 1e-3


@torch.no_grad()
def check_packed_attention(model: nn.Module) -> None:
    """Refuse ``packing`` for a model that attends across the examples of a packed row."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([PROBE_IDS * 2], device=device)
        positions = torch.arange(len(PROBE_IDS), device=device).repeat(1, 2)
        try:
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        except TypeError as error:  # a forward without position_ids
            raise ConfigError(
                f"packing: {type(model).__name__} does not take position_ids ({error}); "
                "train without --packing"
            ) from None
    finally:
        model.train(was_training)
    first, second = logits[0, : len(PROBE_IDS)].float(), logits[0, len(PROBE_IDS) :].float()
    gap = (first - second).abs().max().item()
    scale = first.abs().max().item()
    if not gap <= RELATIVE_TOLERANCE * scale + 1e-6:
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise ConfigError(
            f"packing: {type(model).__name__} (attention {implementation!r}) attends across "
            f"the examples of a packed row (the same tokens gave logits {gap:.3g} apart); "
            "train without --packing"
        )
