"""llama.cpp's first block formats: Q4_0, Q4_1 and Q8_0, 32 values a block.

The arithmetic follows the order of the ``gguf`` package's dequantizers (the scale times
the integer, then the offset) so that every value is bit for bit what they give
(tests/lora/quantized/test_block_formats.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block_format import BlockFormat, empty_values, half, nibbles_into, register_format


def _q4_0(blocks: Tensor) -> Tensor:
    # (n, 18): scale d (fp16), 16 bytes holding 32 four-bit values; x = d · (q - 8)
    d = half(blocks[:, :2])
    q = nibbles_into(empty_values(blocks, 2, 16), blocks[:, 2:]).reshape(len(blocks), 32)
    return q.sub_(8).mul_(d)


def _q4_1(blocks: Tensor) -> Tensor:
    # (n, 20): scale d and minimum m (fp16), 16 bytes of four-bit values; x = d · q + m
    d, m = half(blocks[:, :2]), half(blocks[:, 2:4])
    q = nibbles_into(empty_values(blocks, 2, 16), blocks[:, 4:]).reshape(len(blocks), 32)
    return q.mul_(d).add_(m)


def _q8_0(blocks: Tensor) -> Tensor:
    # (n, 34): scale d (fp16), 32 signed bytes; x = q · d
    d = half(blocks[:, :2])
    q = empty_values(blocks, 32).copy_(blocks[:, 2:].contiguous().view(torch.int8))
    return q.mul_(d)


Q4_0 = register_format(BlockFormat("Q4_0", 2, 32, 18, _q4_0))
Q4_1 = register_format(BlockFormat("Q4_1", 3, 32, 20, _q4_1))
Q8_0 = register_format(BlockFormat("Q8_0", 8, 32, 34, _q8_0))
