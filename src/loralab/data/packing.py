"""Packing: several short examples in one row of at most ``max_length`` tokens, so a batch
computes few padding tokens (``--packing``).

Rows are filled best-fit-decreasing (each example, longest first, goes into the row it
leaves the least room in; a new row where none has room): at most 11/9 of the fewest rows
possible plus one, and deterministic, so the rows, like the batch order, are a pure function of
the data and a resumed run finds the same ones. A packed row keeps where each example
starts (``Encoded.segments``): ``batches.collate`` gives every example position ids from
0, and the model attends within each example only (``training/packed_attention.py``).
The first label of each example is ignored: it would be predicted from the example
before it.
"""

from __future__ import annotations

import bisect

from .batches import length_grouped_order
from .encoding import IGNORE_INDEX, Encoded, counted


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in rows whose lengths sum to at most ``capacity``; the rows
    in the order they were opened, each row's indices in the order they were placed."""
    for index, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"example {index}: {length} tokens do not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # (room left, row) of every row, sorted: the best fit is the first with room enough.
    rooms: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        at = bisect.bisect_left(rooms, (length, -1))
        if at == len(rooms):
            rows.append([index])
            bisect.insort(rooms, (capacity - length, len(rows) - 1))
            continue
        room, row = rooms.pop(at)
        rows[row].append(index)
        bisect.insort(rooms, (room - length, row))
    return rows


def pack(items: list[Encoded], max_length: int) -> list[Encoded]:
    """The causal-LM examples ``items`` in rows of at most ``max_length`` tokens."""
    rows = []
    for indices in best_fit_decreasing([len(item) for item in items], max_length):
        input_ids: list[int] = []
        labels: list[int] = []
        for index in indices:
            item = items[index]
            input_ids += item.input_ids
            labels += [IGNORE_INDEX, *item.labels[1:]]
        segments = tuple(len(items[index]) for index in indices)
        rows.append(Encoded(input_ids, labels, segments=segments))
    return rows


def fill(items: list[Encoded], batches: list[list[int]]) -> float:
    """Tokens the loss counts over tokens computed (padding included) in ``batches`` of
    ``items``: how much of a step's work is learning."""
    return _fill([len(item) for item in items], [counted(item) for item in items], batches)


def fills(items: list[Encoded], max_length: int, batch_size: int, seed: int) -> tuple[float, float]:
    """The fill of ``items`` over an epoch's batches as a run draws them, and the fill
    ``pack`` gives them (found from their lengths alone, no row built: what ``--packing``
    gains on this data, whether or not the run packs)."""
    lengths = [len(item) for item in items]
    counts = [counted(item) for item in items]  # a packed row ignores the same first labels
    plain = _fill(lengths, counts, length_grouped_order(lengths, batch_size, seed, 0))
    rows = best_fit_decreasing(lengths, max_length)
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    row_counts = [sum(counts[i] for i in row) for row in rows]
    packed = _fill(row_lengths, row_counts, length_grouped_order(row_lengths, batch_size, seed, 0))
    return plain, packed


def _fill(lengths: list[int], counts: list[int], batches: list[list[int]]) -> float:
    computed = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return sum(counts[i] for batch in batches for i in batch) / max(computed, 1)
