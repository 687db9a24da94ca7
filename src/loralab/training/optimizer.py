"""The optimizer of a run: AdamW over the trained parameters (a classifier's new head in a
group of its own when it has its own learning rate), and the learning-rate schedule:
linear warm-up, then linear, cosine or constant."""

from __future__ import annotations

import math

import torch

from ..lora.architectures import classifier_head
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


def parameter_groups(model, config: TrainConfig, parameters: list) -> list:
    """The parameters as AdamW takes them: one group, or the head in a group of its own
    at ``head_learning_rate`` (the schedule scales both alike)."""
    if config.head_learning_rate is None:
        return parameters
    head = classifier_head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    rest = [p for p in parameters if id(p) not in head_ids]
    in_head = [p for p in parameters if id(p) in head_ids]
    return [{"params": rest}, {"params": in_head, "lr": config.head_learning_rate}]


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
