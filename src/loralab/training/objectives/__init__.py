"""What a run minimises: supervised fine-tuning's loss (``sft``, the training loop's own),
a preference objective on pairs of replies (``dpo``, ``ipo``, ``simpo``, ``orpo``), KTO
on single completions marked desirable or not (``kto``), or
GRPO's clipped surrogate on sampled completions (``grpo``, ``grpo.py`` and
``grpo_step.py``). Each preference objective is one file and its line here."""

from __future__ import annotations

from ...lora.config import ConfigError
from .dpo import Dpo
from .ipo import Ipo
from .objective import PairLogProbs, PreferenceLoss, PreferenceObjective, PreferenceSettings
from .orpo import Orpo
from .simpo import Simpo

PREFERENCE_OBJECTIVES: dict[str, PreferenceObjective] = {
    objective.name: objective for objective in (Dpo(), Ipo(), Simpo(), Orpo())
}
OBJECTIVE_NAMES = ("sft", *PREFERENCE_OBJECTIVES, "kto", "grpo")


def preference_objective(name: str) -> PreferenceObjective | None:
    """The pairwise preference objective called ``name``; None for ``sft``, ``kto`` (one
    completion at a time: ``kto.py``) and ``grpo``."""
    if name in ("sft", "kto", "grpo"):
        return None
    try:
        return PREFERENCE_OBJECTIVES[name]
    except KeyError:
        raise ConfigError(
            f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVE_NAMES)}"
        ) from None


__all__ = [
    "OBJECTIVE_NAMES",
    "PREFERENCE_OBJECTIVES",
    "PairLogProbs",
    "PreferenceLoss",
    "PreferenceObjective",
    "PreferenceSettings",
    "preference_objective",
]
