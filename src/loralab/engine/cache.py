"""The KV cache: per layer one key and one value buffer (rows, kv heads, positions, head
dim), allocated once. Each row writes at its own positions, so rows of different prompt
lengths need no left padding; a step reads only the first ``live`` positions (the live
length rounded up to a bucket), never the whole buffer, and the rows of a batch are the
first rows of the buffer, so that read is a view, not a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# The live length is rounded up to a multiple of this: the attention's key count changes
# once every BUCKET positions, not at every step (what a compiled step will need).
BUCKET = 64


class KVCache:
    """Keys and values of ``rows`` sequences of up to ``length`` positions each."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (rows, kv_heads, length, head_dim)
        # Left unwritten: a long prompt's cache is hundreds of MB, whose first touch (page
        # faults and zeros: 0.4–0.6 s for 6,000 positions of SmolLM2 on a 2-core VM) would
        # stall the running streams; positions are zeroed as steps come to read them.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.length = rows, length
        self.ready = 0  # positions 0 … ready − 1 hold numbers in every row (zeros at least)
        self._heads = torch.arange(kv_heads, device=device)

    def grow(self, rows: int, length: int) -> None:
        """Make room for at least ``rows`` rows of ``length`` positions, keeping what is
        stored (a server sizes its cache by the requests it has, not the worst case)."""
        if rows <= self.rows and length <= self.length:
            return
        rows, length = max(rows, self.rows), max(length, self.length)
        ready = self.ready
        for buffers in (self.keys, self.values):
            for index, old in enumerate(buffers):
                new = old.new_empty(rows, old.shape[1], length, old.shape[3])
                new[: self.rows, :, :ready] = old[:, :, :ready]
                new[self.rows :, :, :ready] = 0
                buffers[index] = new
        self.rows, self.length = rows, length

    def ensure(self, length: int) -> None:
        """Positions 0 … ``length`` − 1 of every row hold numbers (zeros where nothing was
        written): before a forward reads them, or a copy writes past ``ready``. A masked
        key's weight is 0, but 0 × NaN is not."""
        if length <= self.ready:
            return
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[:, :, self.ready : length] = 0
        self.ready = length

    def slots(self, positions: Tensor, first: int = 0) -> Tensor:
        """Where keys and values (R, kv heads, T, head dim) of rows ``first`` … ``first +
        R − 1`` at ``positions`` (R, T) go in a layer's buffer seen as (rows · kv heads ·
        length, head dim), in their own order: found once per forward for every layer."""
        rows = torch.arange(first, first + positions.shape[0], device=positions.device)
        heads = len(self._heads)
        base = (rows[:, None] * heads + self._heads[None, :]) * self.length  # (R, kv)
        return (base[:, :, None] + positions[:, None, :]).flatten()

    def write(self, layer: int, keys: Tensor, values: Tensor, slots: Tensor) -> None:
        """Store ``keys`` and ``values`` (R, kv heads, T, head dim) at ``slots``
        (``slots(positions, first)``), each row at its own positions: one ``index_copy_``
        each, not an indexed assignment, whose index tensors would be broadcast anew in
        every layer."""
        dim = keys.shape[-1]
        self.keys[layer].view(-1, dim).index_copy_(0, slots, keys.reshape(-1, dim))
        self.values[layer].view(-1, dim).index_copy_(0, slots, values.reshape(-1, dim))

    def read(self, layer: int, rows: int, live: int, first: int = 0) -> tuple[Tensor, Tensor]:
        """The first ``live`` positions of rows ``first`` … ``first + rows − 1``: views,
        not copies."""
        span = slice(first, first + rows)
        return self.keys[layer][span, :, :live], self.values[layer][span, :, :live]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy row ``source``'s first ``length`` positions into row ``target`` (a row
        that leaves the middle of a batch is replaced by its last row)."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, :length] = buffer[source, :, :length]

    def drop(self, rows: Iterable[int], count: int, lengths: Sequence[int]) -> list[int]:
        """Free ``rows`` of the first ``count`` cache rows, each taken by the row then last
        (its first ``lengths[i]`` positions copied, ``i`` its index before): a row that
        leaves costs one row's copy, not a shift of every row after it. Returns the index
        before of each row that stays, in its new order."""
        order = list(range(count))
        for row in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                self.move(last, row, int(lengths[order[last]]))
                order[row] = order[last]
            order.pop()
        return order

    def live_length(self, last_position: int) -> int:
        """The positions a step attends over: up to ``last_position``, rounded up to a
        bucket (never beyond the buffer)."""
        needed = last_position + 1
        return min(self.length, -(-needed // BUCKET) * BUCKET)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
