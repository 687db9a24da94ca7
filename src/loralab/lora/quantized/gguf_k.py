"""llama.cpp's k-quants Q4_K, Q5_K and Q6_K: super-blocks of 256 values in sub-blocks
of 32 (16 for Q6_K), each sub-block with its own 6- or 8-bit scale (and minimum). They
are what most published GGUF files use.

As in ``gguf_legacy.py``, the order of the arithmetic is the ``gguf`` package's, so the
values are bit for bit its dequantizers'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block_format import BlockFormat, empty_values, half, nibbles_into, register_format

SUPER = 256  # values in a super-block (QK_K)
SCALE_BYTES = 12  # Q4_K and Q5_K: 8 six-bit scales and 8 six-bit minimums


def _scales_and_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 12 bytes (n, 12) → the 8 sub-block scales and 8 minimums, (n, 8) each.

    Bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 minimums 0-3; bytes 8-11
    hold scales 4-7 (low nibble) and minimums 4-7 (high nibble), whose top two bits are
    the top bits of bytes 0-3 and 4-7."""
    low, high, extra = packed.reshape(-1, 3, 4).unbind(dim=1)
    scales = torch.cat((low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)), dim=-1)
    mins = torch.cat((high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)), dim=-1)
    return scales, mins


def _scaled(blocks: Tensor, q: Tensor) -> Tensor:
    """Q4_K and Q5_K's last step, in place on the values ``q`` (n, 8, 32): d·scale·q −
    dmin·min per sub-block of 32."""
    n = len(blocks)
    d, dmin = half(blocks[:, :2]), half(blocks[:, 2:4])
    scales, mins = _scales_and_mins(blocks[:, 4 : 4 + SCALE_BYTES])
    d = (d * scales.float()).reshape(n, 8, 1)
    dm = (dmin * mins.float()).reshape(n, 8, 1)
    return q.mul_(d).sub_(dm).reshape(n, SUPER)


def _q4_k(blocks: Tensor) -> Tensor:
    # (n, 144): d, dmin, 12 scale bytes, 128 bytes of four-bit values: each 32 bytes
    # hold a pair of sub-blocks, the first in the low nibbles.
    n = len(blocks)
    q = nibbles_into(empty_values(blocks, 4, 2, 32), blocks[:, 4 + SCALE_BYTES :].reshape(n, 4, 32))
    return _scaled(blocks, q.reshape(n, 8, 32))


def _q5_k(blocks: Tensor) -> Tensor:
    # (n, 176): d, dmin, 12 scale bytes, 32 bytes of fifth bits (bit j of byte l is the
    # fifth bit of value l of sub-block j), 128 bytes of four-bit values as in Q4_K.
    n = len(blocks)
    start = 4 + SCALE_BYTES
    high = blocks[:, start : start + 32].reshape(n, 1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    fifth = ((high >> shifts) & 1) << 4  # (n, 8, 32)
    low = blocks[:, start + 32 :].reshape(n, 4, 1, 32)
    q = torch.cat((low & 0x0F, low >> 4), dim=2).reshape(n, 8, 32) | fifth
    return _scaled(blocks, empty_values(blocks, 8, 32).copy_(q))


def _q6_k(blocks: Tensor) -> Tensor:
    # (n, 210): 128 bytes of low four bits, 64 bytes of high two bits, 16 signed 8-bit
    # scales (one per 16 values), d (fp16); x = d · scale · (q - 32).
    n = len(blocks)
    low = blocks[:, :128].reshape(n, 2, 1, 64)
    low = torch.cat((low & 0x0F, low >> 4), dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts.reshape(1, 1, 4, 1)) & 3
    q = empty_values(blocks, 16, 16).copy_((low | (high.reshape(n, 8, 32) << 4)).reshape(n, 16, 16))
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (half(blocks[:, 208:210]) * scales).reshape(n, 16, 1)
    return q.sub_(32).mul_(d).reshape(n, SUPER)


Q4_K = register_format(BlockFormat("Q4_K", 12, SUPER, 144, _q4_k))
Q5_K = register_format(BlockFormat("Q5_K", 13, SUPER, 176, _q5_k))
Q6_K = register_format(BlockFormat("Q6_K", 14, SUPER, 210, _q6_k))
