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
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads).

    A batch of packed rows (``packing.py``) has ``position_ids`` instead of an attention
    mask: each example's from 0, and the padding after the last one its own sequence, so
    the model attends within each example only (``training/packed_attention.py``)."""
    if any(item.segments is not None for item in items):
        return _collate_packed(items, pad_id)
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


def _collate_packed(items: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    positions = []
    for row, item in enumerate(items):
        input_ids[row, : len(item)] = torch.tensor(item.input_ids)
        labels[row, : len(item)] = torch.tensor(item.labels)
        segments = item.segments or (len(item),)
        lengths = [*segments, width - len(item)] if width > len(item) else list(segments)
        positions.append(torch.cat([torch.arange(length) for length in lengths]))
    return {"input_ids": input_ids, "position_ids": torch.stack(positions), "labels": labels}
