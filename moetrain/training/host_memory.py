"""Host memory of CPU training: keep freed memory in the process (glibc), so a step does not page-fault,
and bound the matmul kernel caches (:func:`bound_kernel_caches`), so they do not fill with one kernel
per expert row count.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh ``mmap``s and
returns them to the OS on free. A training step frees and reallocates the same large tensors every
time (the stacked expert weights' gradients are E x D x F), so each step pays first-touch page faults
on them. ``mallopt(M_MMAP_MAX, 0)`` serves every allocation from the heap and
``mallopt(M_TRIM_THRESHOLD, 2 GiB)`` keeps freed heap memory, so the next step reuses it. The cost is
a resident set that stays at its peak. Measured in docs/benchmarks.md ("The host allocator").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
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


# oneDNN's cache of compiled kernels (primitives) and ideep's cache of its matmul objects, both keyed by
# shape and 1024 entries by default. They are read when first used, so setting them before the first
# bf16 matmul is enough.
KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int) -> dict[str, str]:
    """Cap the CPU matmul kernel caches at ``capacity`` entries each, unless the environment already
    sets them; returns the values in force.

    Each distinct matmul shape gets its own kernel; an MoE layer's experts see new row counts every
    step, so with 1024 entries the caches fill with kernels that are never reused (bf16 on the tiny LM
    of docs/benchmarks.md, "CPU kernel caches": 1.3 GB resident at 8 experts with the library's
    default, 0.74 GB at 256). A smaller cache evicts kernels that would have been reused, so it is a
    trade: at 32 experts 64 entries cost 11 % of the tokens/s. fp32 matmuls go to MKL and use neither
    cache. ``LRU_CACHE_CAPACITY=0`` crashes ideep, hence ``capacity >= 1``.
    """
    if capacity < 1:
        raise ValueError(f"kernel cache capacity must be >= 1, got {capacity}")
    for var in KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(capacity))
    return {var: os.environ[var] for var in KERNEL_CACHE_VARS}
