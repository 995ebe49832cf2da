"""Keep freed host memory in the process (glibc), so CPU training does not page-fault every step.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh ``mmap``s and
returns them to the OS on free. A training step frees and reallocates the same large tensors every
time (the stacked expert weights' gradients are E x D x F), so each step pays first-touch page faults
on them. ``mallopt(M_MMAP_MAX, 0)`` serves every allocation from the heap and
``mallopt(M_TRIM_THRESHOLD, 2 GiB)`` keeps freed heap memory, so the next step reuses it. The cost is
a resident set that stays at its peak. Measured in docs/benchmarks.md ("Host allocator").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # an int: the largest glibc takes


def retain_freed_memory() -> bool:
    """Apply the two settings; False (and nothing changed) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
