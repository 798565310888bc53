"""daemon.node.heap: on glibc the freed heap goes back to the kernel after a whole-model pass."""

from __future__ import annotations

import platform

import numpy as np
import psutil
import pytest

from daemon.node import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_gives_freed_heap_memory_back() -> None:
    assert heap._malloc_trim is not None
    kept = [np.ones(2**14, dtype=np.float64) for _ in range(4096)]  # 512 MiB in 128 KiB heap chunks
    del kept[:-1]  # freed, but the last one pins the heap's top: only a trim can give the rest back
    before = psutil.Process().memory_info().rss
    heap.trim()
    assert psutil.Process().memory_info().rss < before - 256 * 2**20
