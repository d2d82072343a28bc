"""Keeping freed memory in the process on CPU, so that training steps stop page-faulting their activations in.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on
free, and it hands a large free top of its heap back to the system. A CPU training step allocates and frees the
same feature maps every time, so each step has the kernel fault in and zero them again. Kept, a resnet20 step
on 2 cores is 13-24% faster (17-21% with φ; benchmarks/RESULTS.md, "Freed memory kept"); the price is a resident
size that stays near the run's peak.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never to shrink the heap, so that freed
    feature maps are reused in place. Process-wide and idempotent; the training entry points call it on CPU.
    Returns whether mallopt accepted both settings: False where the C library is not glibc. Under a preloaded
    malloc (tcmalloc, jemalloc) that allocator decides instead."""
    libc = ctypes.CDLL(None)  # the symbols this process already has: its C library, or a preloaded malloc
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD))
