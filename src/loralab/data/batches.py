"""Batches: examples of similar length grouped (less padding), in an order the seed fixes
and a run can resume in, and padded into tensors.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch import Tensor

from .encoding import IGNORE_INDEX, Encoded


def length_grouped_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of example indices with similar lengths, so padding stays small.

    Shuffled by ``(seed, epoch)`` alone, so the order is a pure function of them: a resumed
    run finds its place from the step number. Examples are shuffled, cut into groups of
    50 batches, sorted by length within a group, batched, and the batches shuffled.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    group = batch_size * 50
    batches = []
    for start in range(0, len(indices), group):
        chunk = sorted(indices[start : start + group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(
    lengths: list[int], batch_size: int, seed: int, start: int = 0
) -> Iterator[list[int]]:
    """Batches forever, epoch after epoch, from the ``start``-th batch on."""
    epoch, position = 0, 0
    while True:
        batches = length_grouped_order(lengths, batch_size, seed, epoch)
        for batch in batches:
            if position >= start:
                yield batch
            position += 1
        epoch += 1


def collate(items: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item)] = torch.tensor(item.input_ids)
        attention_mask[row, : len(item)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(items[0].labels, int):
        batch["labels"] = torch.tensor([item.labels for item in items])
    else:
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, : len(item)] = torch.tensor(item.labels)
        batch["labels"] = labels
    if items[0].token_type_ids is not None:
        token_types = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            token_types[row, : len(item)] = torch.tensor(item.token_type_ids)
        batch["token_type_ids"] = token_types
    return batch
