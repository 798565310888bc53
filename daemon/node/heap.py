"""Give the heap's free memory back to the kernel after a whole-model pass.

A pass over a 100M-parameter model (snapshot encode, state hash, materialize) allocates and frees
hundreds of 8 MiB temporaries in a worker thread; glibc keeps much of what was freed in its arenas, so the
daemon's resident set stayed 1-3 bytes per parameter above what it holds (bench/bench_model_scale.py and
a probe, 2026-12-02: ``malloc_trim(0)`` after the passes gave 0.9 B/param back at 50M). Elsewhere (musl,
macOS) there is no ``malloc_trim`` and this does nothing. Rejected: a lower mmap threshold for all
allocations (measured 2026-12-01: it slowed a round's accept from 2.3 to 3.6 s at 100M).
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["trim"]

_libc_name = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_libc_name), "malloc_trim", None) if _libc_name else None


def trim() -> None:
    """Return free heap memory to the kernel (glibc ``malloc_trim(0)``); a no-op without it."""
    if _malloc_trim is not None:
        _malloc_trim(0)
