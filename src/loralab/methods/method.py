"""What an adaptation method is: the ``Method`` protocol and its optional capabilities,
the settings of the methods other than LoRA, and the record of which method a model carries.

A method freezes the base and adds or unfreezes the parameters it trains. Whatever
requires grad after ``apply`` is, by definition, what the method trains: ``trained_weights.py``
saves exactly that, and ``expected_parameters`` states the paper's formula for the same
number, so a test can hold the two against each other. What only some methods do (a
regulariser, a step after each update, a file format of their own, a report) is declared
by the protocol and is None elsewhere, so the training loop, the files and the experiments
ask the method instead of naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..lora.config import LoraConfig, require_int
from ..lora.state import has_state, model_state


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

    def configured(self, run: Any) -> Method:
        """The method as a training run applies it, built once from the run's settings
        (``run`` is a ``TrainConfig``); a method without settings of its own is itself."""

    # -- optional capabilities: None where a method has none ------------------------------

    fsdp_refusal: str | None
    """Why the method cannot train with its model sharded by FSDP (None: it can)."""
    regularizer: Callable[[nn.Module], Tensor | None] | None
    """``regularizer(model)``: a term added to each micro-batch's loss (not to the logged
    loss), e.g. AdaLoRA's orthogonality term."""
    after_optimizer_step: Callable[[nn.Module, int, int], None] | None
    """``after_optimizer_step(model, step, max_steps)``: runs after each optimizer step with
    that step's gradients still there (``step`` counts from 1); AdaLoRA scores and prunes."""
    save: Callable[[nn.Module, Path, str | None], Path] | None
    """``save(model, directory, base_model_name_or_path)``: a file format of the method's
    own, used by ``files.save_method`` instead of the generic one."""
    load: Callable[[nn.Module, Path], nn.Module] | None
    """``load(model, directory)``: reads what ``save`` wrote."""
    peft_type: str | None
    """The ``peft_type`` of the PEFT files ``save`` writes, so that a PEFT adapter of that
    type is read as this method (AdaLoRA: ``"ADALORA"``)."""
    write_report: Callable[[nn.Module, Path], Any] | None
    """``write_report(model, run_dir)``: what the method writes after training (AdaLoRA's
    final ranks)."""
    final_trainable: Callable[[nn.Module], int] | None
    """``final_trainable(model)``: trained parameters that still count at the end of
    training, where that differs from the count before (AdaLoRA prunes)."""


class PlainMethod:
    """The defaults of a method: no settings of its own and none of the optional
    capabilities. A method class inherits it and sets what it has."""

    fsdp_refusal: str | None = None
    regularizer = None
    after_optimizer_step = None
    save = None
    load = None
    peft_type: str | None = None
    write_report = None
    final_trainable = None

    def configured(self, run: Any) -> Method:
        return self


def record_method(
    model: nn.Module, name: str, settings: MethodSettings, lora: LoraConfig | None
) -> None:
    model_state(model).method = MethodRecord(name, settings, lora)


def applied_method(model: nn.Module) -> MethodRecord | None:
    """The method ``apply`` put on ``model``, if any."""
    return model_state(model).method if has_state(model) else None
