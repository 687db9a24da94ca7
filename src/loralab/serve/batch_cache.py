"""The running requests' keys and values, one row each, as one left-padded cache.

Every row ends at the same column, so one decoding step appends one column for all rows;
a row with a shorter history has padding on its left, masked out. Requests that join are
prefilled together, left-padded, and their rows are padded to the batch's width (or the
batch to theirs); one that leaves drops its row, and the columns left holding only
padding are cut away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedModel(ValueError):
    """The model's cache is not one the batch can pad and split by rows."""


def new_cache(config) -> DynamicCache:
    """An empty cache for a prefill, refused for caches that are not plain per-layer keys
    and values (sliding windows, linear attention, …): their rows cannot be padded."""
    cache = DynamicCache(config=config)
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise UnsupportedModel(
            f"serving needs a model whose every layer keeps plain keys and values; "
            f"{config.model_type} has {', '.join(sorted(odd))}"
        )
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


class GrowingLayer(DynamicLayer):
    """A layer's keys and values as the first columns of buffers with room for more.

    Transformers' own layer concatenates, copying the whole cache at every step (11 of a
    140 ms step at 32 rows × 35 columns on SmolLM2, growing with the length); here a
    step writes its column in place, and only a buffer that is full, or was replaced by
    the batch's own padding and selecting, is copied into a larger one.
    """

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = _append(self.keys, key_states)
            self.values = _append(self.values, value_states)
        return self.keys, self.values


def _append(states: Tensor, new: Tensor) -> Tensor:
    rows, heads, length, dim = states.shape
    count = new.shape[-2]
    buffer = states._base
    if (
        buffer is not None
        and buffer.dim() == 4
        and buffer.shape[:2] == (rows, heads)
        and buffer.shape[2] >= length + count
        and states.data_ptr() == buffer.data_ptr()
        and states.stride() == buffer.stride()
    ):  # the leading columns of a buffer with room
        buffer[:, :, length : length + count] = new
        return buffer[:, :, : length + count]
    buffer = states.new_empty(rows, heads, length + count + max(32, length // 4), dim)
    buffer[:, :, :length] = states
    buffer[:, :, length : length + count] = new
    return buffer[:, :, : length + count]


class BatchCache:
    """Rows of keys and values, left-padded to one width, with each row's real length."""

    def __init__(self, config) -> None:
        self.config = config
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    def __len__(self) -> int:
        return len(self.lengths)

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """The attention mask (rows, width + 1) and position ids (rows, 1) of the next step,
        whose one new token per row goes in the last column."""
        device = self.cache.layers[0].keys.device
        lengths = torch.tensor(self.lengths, device=device)
        width = self.width
        columns = torch.arange(width + 1, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def stepped(self) -> None:
        """Count the column the last step appended."""
        self.lengths = [n + 1 for n in self.lengths]

    def add(self, rows: DynamicCache, lengths: list[int], take: list[int]) -> None:
        """Append rows ``take`` of a prefill's cache, left-padded with real ``lengths``."""
        if not take:
            return
        lengths = [lengths[i] for i in take]
        index = torch.tensor(take, device=rows.layers[0].keys.device)
        cut = rows.get_seq_length() - max(lengths)  # columns only padding of dropped rows
        new = [
            (
                layer.keys.index_select(0, index)[:, :, cut:],
                layer.values.index_select(0, index)[:, :, cut:],
            )
            for layer in rows.layers
        ]
        if self.cache is None:
            for layer, (keys, values) in zip(rows.layers, new, strict=True):
                layer.keys, layer.values = keys, values
            self.cache, self.lengths = rows, lengths
            return
        width, length = self.width, max(lengths)
        for mine, (keys, values) in zip(self.cache.layers, new, strict=True):
            if length > width:  # the batch grows to the newcomers' width
                mine.keys = _pad_left(mine.keys, length - width)
                mine.values = _pad_left(mine.values, length - width)
            mine.keys = torch.cat([mine.keys, _pad_left(keys, width - length)])
            mine.values = torch.cat([mine.values, _pad_left(values, width - length)])
        self.lengths += lengths

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), and cut the columns left all padding."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        if rows == list(range(len(self.lengths))):
            return
        self.lengths = [self.lengths[i] for i in rows]
        cut = self.width - max(self.lengths)
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]


def _pad_left(states: Tensor, columns: int) -> Tensor:
    return F.pad(states, (0, 0, max(columns, 0), 0)) if columns > 0 else states
