"""What every built-in task offers, and the split machinery the generated tasks share.

A task is a seeded generator of examples (plain dicts) plus its metric. Determinism is
the contract: the same seed gives the same splits in any process, so nothing here uses
Python's ``hash()`` or set iteration order; split membership comes from SHA-256.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

Example = dict[str, Any]
SPLIT_NAMES = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # of the groups, for validation and again for test


class TaskError(ValueError):
    """A task was asked for something it cannot give; the message names the task."""


@runtime_checkable
class Task(Protocol):
    """A built-in task: seeded splits of example dicts, and the metrics to score them."""

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


class Candidate(NamedTuple):
    """One example a generator offers to ``fill_splits``.

    ``group`` decides the split (everything sharing a group lands in the same split, so
    held-out groups are never seen in training); ``key`` identifies the example, and a
    repeated key is skipped. ``build`` makes the example only if it is taken.
    """

    group: str
    key: str
    build: Callable[[], Example]
    label: int | None = None


def resolve_sizes(
    task: str,
    requested: Mapping[str, int | None],
    defaults: Mapping[str, int],
    maxima: Mapping[str, int],
) -> dict[str, int]:
    """Sizes per split: the default where None, refused with the maximum where too large."""
    sizes = {}
    for split in SPLIT_NAMES:
        size = requested.get(split)
        if size is None:
            size = min(defaults[split], maxima[split])
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TaskError(f"{task}: {split}_size must be a non-negative integer, got {size!r}")
        if size > maxima[split]:
            raise TaskError(
                f"{task}: {split}_size={size} is more than the {maxima[split]} distinct "
                f"{split} examples this task can generate; the maximum is {maxima[split]}"
            )
        sizes[split] = size
    return sizes


def split_of(task: str, seed: int, group: str) -> str:
    """The split a group belongs to, from a hash that is the same in every process."""
    digest = hashlib.sha256(f"{task}\0{seed}\0{group}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if position < HELD_OUT_FRACTION:
        return "test"
    if position < 2 * HELD_OUT_FRACTION:
        return "validation"
    return "train"


def fill_splits(
    task: str,
    seed: int,
    candidates: Iterable[Candidate],
    sizes: Mapping[str, int],
    num_labels: int | None = None,
    patience: int = 200_000,
) -> dict[str, list[Example]]:
    """Take candidates, in order, into their group's split until every split is full.

    A split's examples depend only on the seed and its own size, never on the other
    splits' sizes. With ``num_labels`` each split holds every label ``size / num_labels``
    times (the first ``size % num_labels`` labels once more). ``patience`` candidates in a
    row that add nothing mean the generator has run dry.
    """
    quotas = {
        split: _label_quotas(sizes[split], num_labels) if num_labels else None
        for split in SPLIT_NAMES
    }
    taken: dict[str, list[Example]] = {split: [] for split in SPLIT_NAMES}
    seen: set[str] = set()  # membership only; never iterated, so its order cannot leak
    idle = 0
    for candidate in candidates:
        if all(len(taken[split]) >= sizes[split] for split in SPLIT_NAMES):
            return taken
        idle += 1
        if idle > patience:
            break
        split = split_of(task, seed, candidate.group)
        if len(taken[split]) >= sizes[split] or candidate.key in seen:
            continue
        quota = quotas[split]
        if quota is not None:
            if candidate.label is None or quota[candidate.label] == 0:
                continue
            quota[candidate.label] -= 1
        seen.add(candidate.key)
        taken[split].append(candidate.build())
        idle = 0
    if all(len(taken[split]) >= sizes[split] for split in SPLIT_NAMES):
        return taken
    short = {s: f"{len(taken[s])}/{sizes[s]}" for s in SPLIT_NAMES if len(taken[s]) < sizes[s]}
    raise TaskError(f"{task}: the generator ran dry at {short} examples; ask for fewer")


def _label_quotas(size: int, num_labels: int) -> list[int]:
    base, extra = divmod(size, num_labels)
    return [base + (1 if label < extra else 0) for label in range(num_labels)]


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


class GeneratedTask:
    """The split logic shared by tasks whose examples come from a seeded generator.

    A subclass sets ``name``, ``default_sizes``, ``maxima`` (and ``num_labels`` for
    balanced labels) and yields its candidates from ``candidates(seed)``.
    """

    name: str
    default_sizes: Mapping[str, int]
    maxima: Mapping[str, int]
    num_labels: int | None = None

    def candidates(self, seed: int) -> Iterable[Candidate]:
        raise NotImplementedError

    def splits(
        self,
        seed: int = 0,
        train_size: int | None = None,
        validation_size: int | None = None,
        test_size: int | None = None,
    ) -> dict[str, list[Example]]:
        requested = {"train": train_size, "validation": validation_size, "test": test_size}
        sizes = resolve_sizes(self.name, requested, self.default_sizes, self.maxima)
        return fill_splits(self.name, seed, self.candidates(seed), sizes, self.num_labels)
