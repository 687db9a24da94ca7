"""Which parameters a method trains, and copying them in and out: freezing the base, the
classifier head that always trains, the trained state, and a weightless twin of a model to
rehearse a load on.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..lora.architectures import classifier_head
from ..lora.config import ConfigError


def freeze(model: nn.Module) -> None:
    """Every parameter frozen; the method then unfreezes or adds what it trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def head_parameters(model: nn.Module) -> int:
    """Parameters of the classification head (0 for a language model)."""
    head = classifier_head(model)
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


def unfreeze_head(model: nn.Module) -> None:
    head = classifier_head(model)
    if head is not None:
        head.requires_grad_(True)


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter that trains, by its name in the model (shared ones once)."""
    return {
        name: parameter.detach()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def load_trained_state(
    model: nn.Module, expected: dict[str, Tensor], tensors: dict[str, Tensor], source: str
) -> None:
    """Copy saved ``tensors`` into the parameters ``expected`` names: every name and shape
    is checked first, so on any mismatch the model is unchanged."""
    live = dict(model.named_parameters())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
        raise ConfigError(
            f"{source}: the saved parameters do not fit this model: {'; '.join(parts)}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(live[name].shape):
            raise ConfigError(
                f"{source}: {name} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(live[name].shape)} in the model"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            live[name].copy_(tensor)


def shape_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device.

    It costs no memory for weights, so a method can be tried on it first: a load checks
    the file against the twin and touches the real model only when everything fits.
    """
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        # (a quantized weight is an integer parameter, which may not require a gradient)
        twin = nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
        memo[id(parameter)] = twin
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)
