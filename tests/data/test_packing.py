"""Packing: best-fit-decreasing rows, each example's first label ignored, and position ids
that restart at every example (the padding its own sequence)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from loralab.data.batches import collate
from loralab.data.encoding import IGNORE_INDEX, Encoded
from loralab.data.packing import best_fit_decreasing, fill, pack


def _fewest_rows(lengths: list[int], capacity: int) -> int:
    """The fewest rows possible, by trying every assignment (small inputs only)."""
    for rows in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(rows), repeat=len(lengths)):
            loads = [0] * rows
            for length, row in zip(lengths, assignment, strict=True):
                loads[row] += length
            if max(loads) <= capacity:
                return rows
    raise AssertionError("unreachable")


def test_every_example_lands_in_one_row_within_the_capacity():
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 20, 40, 60, 200]) for _ in range(500)]
    rows = best_fit_decreasing(lengths, 256)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    # Within the best-fit-decreasing bound of the fewest possible (at least the sum's).
    fewest = -(-sum(lengths) // 256)
    assert len(rows) <= 11 / 9 * fewest + 1
    assert best_fit_decreasing(lengths, 256) == rows  # deterministic


@pytest.mark.parametrize("seed", range(8))
def test_best_fit_is_near_the_optimum_on_small_inputs(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 10) for _ in range(7)]
    rows = best_fit_decreasing(lengths, 12)
    assert len(rows) <= 11 / 9 * _fewest_rows(lengths, 12) + 6 / 9


def test_best_fit_chooses_the_tightest_row():
    # 7 opens a row (room 3), 6 opens another (room 4); 3 fits both and takes room 3.
    assert best_fit_decreasing([3, 7, 6], 10) == [[1, 0], [2]]


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="example 1: 11 tokens do not fit a row of 10"):
        best_fit_decreasing([3, 11], 10)


def test_packed_rows_ignore_each_examples_first_label():
    items = [
        Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3]),
        Encoded([4, 5], [4, 5]),
        Encoded([6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]),
    ]
    rows = pack(items, 9)
    assert len(rows) == 1
    row = rows[0]
    assert row.segments == (4, 3, 2)  # longest first
    assert row.input_ids == [6, 7, 8, 9, 1, 2, 3, 4, 5]
    assert row.labels == [-100, -100, 8, 9, -100, 2, 3, -100, 5]
    assert fill(rows, [[0]]) == 5 / 9


def test_collate_restarts_positions_and_makes_padding_its_own_sequence():
    rows = [
        Encoded([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5], segments=(3, 2)),
        Encoded([7, 8], [7, 8]),
    ]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [7, 8, -100, -100, -100]]
    assert batch["position_ids"].dtype == torch.long


def test_fill_counts_padding_as_computed():
    items = [Encoded([1] * 4, [1] * 4), Encoded([1] * 2, [-100, 1])]
    # One batch of both: 2 rows × 4 tokens computed; 3 + 1 counted (a row's first never).
    assert fill(items, [[0, 1]]) == 4 / 8


def test_the_fill_packing_would_give_is_found_without_building_rows():
    from loralab.data.batches import length_grouped_order
    from loralab.data.packing import fills

    rng = random.Random(3)
    items = []
    for _ in range(200):
        length = rng.choice([5, 9, 30, 120])
        items.append(Encoded([1] * length, [-100] * (length // 2) + [1] * (length - length // 2)))
    rows = pack(items, 128)
    plain, packed = fills(items, 128, 4, 7)
    assert plain == fill(items, length_grouped_order([len(i) for i in items], 4, 7, 0))
    assert packed == fill(rows, length_grouped_order([len(row) for row in rows], 4, 7, 0))
