"""What every built-in task offers (the ``Task`` protocol), and the helpers its metrics
share: pairing predictions with examples, a generated completion as one clean line, a
percentage, a prediction read as a label.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

Example = dict[str, Any]


# The metrics of which less is better; every other metric of a task, more.
LOWER_IS_BETTER = frozenset({"perplexity", "slot_errors"})


class TaskError(ValueError):
    """A task was asked for something it cannot give; the message names the task."""


@runtime_checkable
class Task(Protocol):
    """A built-in task: seeded splits of example dicts, and the metrics to score them.

    Two capabilities only some tasks have, read with ``getattr`` (None where absent):
    ``preference_splits(seed, train_size)``, the splits as preference pairs for the
    preference objectives (e2e), and ``rewards(completions, examples)``, a verifiable
    reward per completion for GRPO (sql's execution match, e2e's slot coverage).
    """

    name: str
    kind: str
    """"generation", "classification" or "lm"."""
    primary_metric: str
    higher_is_better: bool
    """False only for perplexity."""
    labels: tuple[str, ...] | None
    """Label words of a classification task, index = label id; None otherwise."""
    max_new_tokens: int
    """Generation budget for one completion (0 where nothing is generated)."""

    def splits(
        self,
        seed: int = 0,
        train_size: int | None = None,
        validation_size: int | None = None,
        test_size: int | None = None,
    ) -> dict[str, list[Example]]:
        """``{"train", "validation", "test"}`` → examples; None picks the default size."""
        ...

    def score(self, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
        """Every metric of the task for ``predictions`` against ``examples``."""
        ...


def check_lengths(task: str, predictions: Sequence[Any], examples: Sequence[Example]) -> None:
    """Refuse scoring when predictions and examples do not pair up one to one."""
    if len(predictions) != len(examples):
        raise TaskError(
            f"{task}: got {len(predictions)} predictions for {len(examples)} examples; "
            "score() needs one prediction per example"
        )


def as_text(prediction: Any) -> str:
    """A generated completion as one clean line: the first non-empty line, stripped.

    Completions of the generation tasks never span lines, so whatever a model writes after
    its first line is a run-on past where it should have stopped.
    """
    for line in str(prediction).strip().splitlines():
        return line.strip()
    return ""


def percent(hits: int, total: int) -> float:
    """``hits`` out of ``total`` on a 0–100 scale; 0 for no examples at all."""
    return 100.0 * hits / total if total else 0.0


def label_index(prediction: Any, labels: Sequence[str]) -> int | None:
    """A prediction as a label id: an integer id, or text that starts with a label word.

    Text is stripped of spaces and leading punctuation and lowercased, so " Entailment."
    is label "entailment"; anything else (another word, an id out of range) is None.
    """
    if isinstance(prediction, str):
        word = prediction.strip().lstrip("\"'([{:-*").lower()
        # longest first, so a label word that prefixes another cannot steal its matches
        for label in sorted(labels, key=len, reverse=True):
            if word.startswith(label.lower()):
                return labels.index(label)
        return None
    try:
        index = operator.index(prediction)  # int, bool-free numpy/torch integer scalars
    except TypeError:
        return None
    if isinstance(prediction, bool) or not 0 <= index < len(labels):
        return None
    return index
