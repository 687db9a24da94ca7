"""Freed activation memory back to the system: glibc's malloc serves every block of at
least ``MMAP_THRESHOLD`` bytes from a mapping of its own, which ``free`` unmaps.

By default glibc raises that threshold, up to 32 MB, each time it frees a mapped block,
so after the first step of a training run nearly every activation comes from the heap
instead; the forward pass's temporaries, freed between the tensors kept for the backward
pass, leave holes that stay resident. On SmolLM2's first step at 8 × 58 tokens (one
thread) those holes were 267 MB at the peak, with 691 MB in use; with a fixed threshold
of 1 MiB, which keeps every (tokens, hidden) tensor and larger out of the heap, 46 MB.
Blocks under 1 MiB still fragment the heap over later steps (about 260 MB by the tenth),
and a lower threshold costs more in page faults than it saves: at 256 KiB a SmolLM2 step
took about 1.5× as long. ``benchmarks/bench_train.py`` measures the setting against
glibc's own.

glibc has no call that gives back its adaptive behaviour, so the setting stays for the
life of the process; other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of ``threshold`` bytes or more from their own mappings, for the rest of
    the process; whether it took effect (False off glibc)."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1)


__all__ = ["MMAP_THRESHOLD", "map_large_blocks"]
