"""Let glibc keep freed memory for reuse, so per-batch tensors do not page-fault every step.

Training from the store copies a few large tensors per minibatch (e.g. 128 x 257 x 384
floats per tapped layer). glibc serves allocations this large with fresh ``mmap``
pages and unmaps them on free, so every batch pays page faults for memory it
just released; on a 2-core CPU that was about half of a VQT epoch. Switching
``mmap`` off for ``malloc`` and raising the trim threshold makes freed blocks
reusable, the same effect PyTorch's CPU performance guide gets from jemalloc or
tcmalloc. The resident set then stays near its peak instead of shrinking
between batches. Benchmarks opt in through ``common.py``; set ``FROZENLENS_MALLOC=default`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30
_applied = False


def reuse_freed_memory() -> bool:
    """Apply the setting once per process; True when it is in effect (glibc only)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("FROZENLENS_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    _applied = ok
    return ok
