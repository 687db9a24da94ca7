"""The split machinery the generated tasks share: seeded, held-out train, validation and
test splits.

A task is a seeded generator of examples (plain dicts) plus its metric. Determinism is
the contract: the same seed gives the same splits in any process, so nothing here uses
Python's ``hash()`` or set iteration order; split membership comes from SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from .task import Example, TaskError

SPLIT_NAMES = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # of the groups, for validation and again for test


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
