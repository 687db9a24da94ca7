"""What every adaptation method shares: its settings, its protocol, and the model parts it
needs to find (the transformer blocks, the hidden size).

A method freezes the base and adds or unfreezes the parameters it trains. Whatever
requires grad after ``apply`` is, by definition, what the method trains: the generic
``trained_state`` saves exactly that, and ``expected_parameters`` states the paper's
formula for the same number, so a test can hold the two against each other.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..architectures import classifier_head
from ..config import ConfigError, LoraConfig, require_int
from ..state import has_state, model_state


@dataclass(frozen=True)
class MethodSettings:
    """The hyperparameters of the methods other than LoRA (LoRA's are ``LoraConfig``)."""

    prefix_length: int = 10
    """l_p: trainable tokens before the prompt (PreEmbed, PreLayer, LoRA+PE)."""
    infix_length: int = 0
    """l_i: trainable tokens between the prompt and the completion."""
    adapter_rank: int = 8
    """Bottleneck width r of Adapter^H and Adapter^L (down d→r, up r→d)."""
    top_layers: int = 2
    """FT-Top2: how many of the last transformer blocks train."""

    def __post_init__(self) -> None:
        for name in ("prefix_length", "infix_length"):
            require_int(name, getattr(self, name), minimum=0)
        for name in ("adapter_rank", "top_layers"):
            require_int(name, getattr(self, name), minimum=1)

    @property
    def prompt_tokens(self) -> int:
        """l_p + l_i: the positions a prefix method takes from the context."""
        return self.prefix_length + self.infix_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MethodRecord:
    """Which method a model carries, with its settings (kept in its ``ModelState``)."""

    name: str
    settings: MethodSettings
    lora: LoraConfig | None = None


@runtime_checkable
class Method(Protocol):
    """One way to adapt a frozen model. Implementations are small, stateless objects."""

    name: str
    """The name on the command line (``--method``)."""
    summary: str
    """One line for ``--help`` and tables."""
    mergeable: bool
    """Whether the trained update folds into the base weights (no added latency)."""
    adds_depth: bool
    """Whether every forward runs extra layers (latency that cannot be merged away)."""
    uses_lora: bool
    """Whether ``lora`` (a ``LoraConfig``) is part of the method."""
    companion: Method | None
    """For a method that uses LoRA: the method it adds beside LoRA (LoRA+PE: PreEmbed)."""

    def check(
        self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None, max_length: int
    ) -> None:
        """Raise ``ConfigError`` if the settings do not fit the model (before training)."""

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        """Freeze the base and add or unfreeze what the method trains, in place.

        At step 0 the adapted model computes what the base computed, where the method
        allows it (LoRA's B, adapters' up-projections and new biases start at zero).
        """

    def expected_parameters(
        self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None
    ) -> int:
        """The method's trainable-parameter formula (SPEC.md), from the model's shapes."""


class TrainingHooks(Protocol):
    """What a method may add to the training loop (``train.py`` looks for these by name).

    ``regularizer(model)`` returns a scalar added to every micro-batch's loss (AdaLoRA's
    orthogonality term). ``after_optimizer_step(model, step, max_steps)`` runs after each
    optimizer step, while the gradients of that step are still there (AdaLoRA scores
    importance from them and prunes on its schedule); ``step`` counts from 1.
    """

    def regularizer(self, model: nn.Module) -> Tensor | None: ...

    def after_optimizer_step(self, model: nn.Module, step: int, max_steps: int) -> None: ...


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


def record_method(
    model: nn.Module, name: str, settings: MethodSettings, lora: LoraConfig | None
) -> None:
    model_state(model).method = MethodRecord(name, settings, lora)


def applied_method(model: nn.Module) -> MethodRecord | None:
    """The method ``apply`` put on ``model``, if any."""
    return model_state(model).method if has_state(model) else None


def shape_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device.

    It costs no memory for weights, so a method can be tried on it first: a load checks
    the file against the twin and touches the real model only when everything fits.
    """
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        twin = nn.Parameter(torch.empty_like(parameter, device="meta"))
        twin.requires_grad_(parameter.requires_grad)
        memo[id(parameter)] = twin
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)
