"""The registry of packed weight formats: how a row of a quantized weight is stored in
blocks, and how a block turns back into numbers.

A format packs ``block_values`` consecutive values of a row into ``block_bytes`` bytes
(scales and quantized integers); a row of ``in_features`` values is ``in_features /
block_values`` blocks, so a weight (out, in) is stored as a uint8 tensor (out, row bytes),
and whole rows can be reordered without unpacking. Each format file registers its
formats here by name, with the ``GGMLQuantizationType`` number llama.cpp gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockFormat:
    """One packed format: its size and the function that unpacks its blocks."""

    name: str
    """The name users see (``Q4_1``), GGUF's own."""
    ggml_type: int
    """llama.cpp's ``GGMLQuantizationType`` number for it."""
    block_values: int
    block_bytes: int
    unpack: Callable[[Tensor], Tensor]
    """uint8 blocks (n, block_bytes) → fp32 values (n, block_values)."""

    def row_bytes(self, in_features: int) -> int:
        """The bytes of one packed row of ``in_features`` values."""
        return in_features // self.block_values * self.block_bytes

    def columns(self, row_bytes: int) -> int:
        """The values in a packed row of ``row_bytes`` bytes (``row_bytes``' inverse)."""
        return row_bytes // self.block_bytes * self.block_values

    def refusal(self, in_features: int) -> str | None:
        """Why a row of ``in_features`` values cannot be stored in this format, or None."""
        if in_features % self.block_values:
            return (
                f"{self.name} packs rows in blocks of {self.block_values} values; a row of "
                f"{in_features} is not a whole number of blocks"
            )
        return None

    def dequantize(self, packed: Tensor, in_features: int) -> Tensor:
        """Packed rows (out, row bytes) → the fp32 matrix (out, in)."""
        out = packed.shape[0]
        return self.unpack(packed.reshape(-1, self.block_bytes)).reshape(out, in_features)

    def dequantize_columns(self, packed: Tensor, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of the matrix (both multiples of ``block_values``): the
        same bytes of every row, unpacked."""
        first, last = start // self.block_values, stop // self.block_values
        part = packed[:, first * self.block_bytes : last * self.block_bytes].contiguous()
        return self.dequantize(part, stop - start)


FORMATS: dict[str, BlockFormat] = {}
"""Each registered format by name."""


def register_format(block_format: BlockFormat) -> BlockFormat:
    FORMATS[block_format.name] = block_format
    return block_format


def format_named(name: str) -> BlockFormat:
    """The format ``name``; an unknown one lists those there are."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"{name} is not a packed format loralab computes with; it knows {', '.join(FORMATS)}"
        ) from None


def format_of_ggml_type(ggml_type: int) -> BlockFormat | None:
    """The registered format llama.cpp numbers ``ggml_type`` (None: none is)."""
    return next((f for f in FORMATS.values() if f.ggml_type == ggml_type), None)


def half(column_bytes: Tensor) -> Tensor:
    """Two bytes per row read as one little-endian fp16 number, in fp32: (n, 2) → (n, 1)."""
    return column_bytes.contiguous().view(torch.float16).float()


def nibbles_into(out: Tensor, packed: Tensor) -> Tensor:
    """Bytes (..., k) unpacked into ``out`` (..., 2, k) as numbers: the low four bits of
    each, then the high four (the GGUF blocks keep the first half of their values in the
    low bits). Written straight into the float tensor the values end in, and masked four
    bytes at a time as int32 words (``k`` is a multiple of 4 in every format): 2.4× faster
    than unpacking byte by byte to integers, stacking and converting."""
    words = packed.contiguous().view(torch.int32)
    # A word's shift carries no bit across bytes that the mask keeps: each byte's own
    # high nibble lands in its low nibble.
    out.select(-2, 0).copy_((words & 0x0F0F0F0F).view(torch.uint8))
    out.select(-2, 1).copy_(((words >> 4) & 0x0F0F0F0F).view(torch.uint8))
    return out


def empty_values(blocks: Tensor, *shape: int) -> Tensor:
    """An fp32 tensor for ``len(blocks)`` blocks' values, on the blocks' device."""
    return torch.empty(len(blocks), *shape, dtype=torch.float32, device=blocks.device)
