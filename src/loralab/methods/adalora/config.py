"""AdaLoRA's settings: ``AdaLoraConfig`` (PEFT's names, so a PEFT config maps onto it
one to one), the targets as the core planner reads them, and the schedule's check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...lora.config import (
    ConfigError,
    LoraConfig,
    require_int,
    require_number,
    with_lora_settings,
)

ADAPTER_NAME = "default"  # AdaLoRA trains one adapter, as in PEFT
RANKNUM_EPSILON = 1e-5  # PEFT divides by ranknum + 1e-5


# The settings AdaLoRA shares with LoRA: its targets, α, dropout, biases and saved modules.
# (α scales by α / (init_r + 1e-5) here, PEFT's ``ranknum``.)
SHARED_WITH_LORA = (
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "modules_to_save",
)


@dataclass
@with_lora_settings(*SHARED_WITH_LORA)
class AdaLoraConfig:
    """Settings of AdaLoRA: the SVD-form update, its importance scores and its budget.

    The names are PEFT's (``AdaLoraConfig``), so a PEFT ``adapter_config.json`` maps onto
    them one to one. The schedule has three phases over ``total_step`` optimizer steps:
    warm-up (step ≤ ``tinit``, every triplet kept), reduction (the budget falls on a cubic
    from ``init_r`` to ``target_r`` per matrix, re-allocated every ``deltaT`` steps), and
    final fine-tuning (the last ``tfinal`` steps, with the final ranks fixed).
    """

    init_r: int = 12
    """Triplets each matrix starts with (the rank before pruning)."""
    target_r: int = 8
    """Average triplets per matrix at the end: the total budget is ``target_r`` × matrices."""
    tinit: int = 0
    """Warm-up steps before any pruning."""
    tfinal: int = 0
    """Final steps with the ranks fixed."""
    deltaT: int = 1
    """Steps between two re-allocations of the budget during the reduction phase."""
    beta1: float = 0.85
    """EMA coefficient of the smoothed sensitivity Ī, in (0, 1)."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty Ū, in (0, 1)."""
    orth_reg_weight: float = 0.5
    """Weight γ of the orthogonality regulariser on P and Q (≥ 0; 0 turns it off)."""
    total_step: int | None = None
    """Optimizer steps the schedule spans; None: the training run's ``max_steps``."""
    # And LoRA's own settings, as LoraConfig declares them (``SHARED_WITH_LORA``).

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            require_int(name, getattr(self, name), minimum=1)
        for name in ("tinit", "tfinal"):
            require_int(name, getattr(self, name), minimum=0)
        if self.target_r > self.init_r:
            raise ConfigError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only "
                "prunes triplets, so target_r must be ≤ init_r"
            )
        for name in ("beta1", "beta2"):
            require_number(name, getattr(self, name), above=0, below=1)
        require_number("orth_reg_weight", self.orth_reg_weight, at_least=0)
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        self.targets()  # target_modules, lora_alpha, lora_dropout, bias…: LoraConfig's checks

    def targets(self) -> LoraConfig:
        """The modules to adapt and their α, dropout and biases, as the core planner reads
        them: a ``LoraConfig`` of rank ``init_r`` whose scale is AdaLoRA's."""
        shared = {name: getattr(self, name) for name in SHARED_WITH_LORA}
        return AdaLoraTargets(r=self.init_r, **shared)

    def for_steps(self, max_steps: int) -> AdaLoraConfig:
        """This config for a run of ``max_steps`` steps: ``total_step`` filled in if None.

        Raises ``ConfigError`` before training if the schedule does not fit the run.
        """
        require_int("max_steps", max_steps, minimum=1)
        if self.total_step is None:
            return dataclasses.replace(self, total_step=max_steps)
        if self.total_step > max_steps:
            raise ConfigError(
                f"total_step={self.total_step} is longer than the run (max_steps={max_steps}): "
                "the budget would never reach target_r; set total_step ≤ max_steps"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AdaLoraTargets(LoraConfig):
    """AdaLoRA's targets for the core planner: scale α / (r + 1e-5), PEFT's ``ranknum``."""

    def scale(self, r: int, alpha: float) -> float:
        return alpha / (r + RANKNUM_EPSILON)


def check_schedule(config: AdaLoraConfig, total_step: int) -> None:
    """Refuse a schedule that leaves no steps for the budget to shrink in."""
    require_int("total_step", total_step, minimum=1)
    if config.tinit + config.tfinal >= total_step:
        raise ConfigError(
            f"tinit={config.tinit} + tfinal={config.tfinal} must be less than "
            f"total_step={total_step}: no steps are left for the budget to shrink in"
        )
