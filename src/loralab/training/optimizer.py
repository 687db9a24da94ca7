"""The optimizer of a run: AdamW over the trained parameters (a classifier's new head in a
group of its own when it has its own learning rate), and the learning-rate schedule:
linear warm-up, then linear, cosine or constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lora.architectures import classifier_head
from ..lora.inject import lora_layers
from .config import TrainConfig


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """The multiplier of the peak learning rate at ``step``: warm-up, then the decay."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def parameter_groups(model: nn.Module, config: TrainConfig, parameters: list) -> list:
    """The parameters as AdamW takes them: one group, or groups at their own peak rates
    (the schedule scales all alike):

    - a classifier's new head at ``head_learning_rate``;
    - with ``loraplus_lr_ratio`` λ (LoRA+, Hayou et al., 2024), LoRA's B factors and the
      1-D parameters (biases, DoRA's magnitudes) at λ times the learning rate, as PEFT's
      ``create_loraplus_optimizer`` groups them; A and the rest at the learning rate.
    """
    head = classifier_head(model) if config.head_learning_rate is not None else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    ratio = config.loraplus_lr_ratio
    b_ids = _b_factor_ids(model) if ratio is not None else set()
    rest, in_head, faster = [], [], []
    for parameter in parameters:
        if id(parameter) in head_ids:
            in_head.append(parameter)
        elif ratio is not None and (id(parameter) in b_ids or parameter.dim() == 1):
            faster.append(parameter)
        else:
            rest.append(parameter)
    if config.head_learning_rate is None and ratio is None:
        return parameters
    groups = [{"params": rest}]
    if config.head_learning_rate is not None:
        groups.append({"params": in_head, "lr": config.head_learning_rate})
    if ratio is not None:
        groups.append({"params": faster, "lr": config.learning_rate * ratio})
    return groups


def _b_factor_ids(model: nn.Module) -> set[int]:
    return {
        id(factors.B)
        for layer in lora_layers(model).values()
        for factors in layer.lora.values()
        if isinstance(getattr(factors, "B", None), nn.Parameter)
    }


def build_optimizer(
    config: TrainConfig, parameters: list
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``parameters`` (a list, or ``parameter_groups``'s groups) and its
    schedule, at step 0."""
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config)
    )
    return optimizer, scheduler
