"""``train.deterministic``: bitwise-reproducible runs on the CPU at the default thread count.

With one seed, two runs differ only where a kernel adds floats in an order that depends on thread
timing. On the CPU that is a kernel that accumulates with atomics once a tensor is large enough to
be split over threads (``index_put_(accumulate=True)`` from 32768 elements, the backward of
``param[index]``); below that size, or with one thread, it runs serially, which is why tiny test
models reproduce and realistic ones did not. moetrain's own model no longer calls such a kernel on
the CPU (``per_row`` in ``moetrain/moe/experts.py``); this mode makes PyTorch guarantee it for every
op, including ones added later: each op takes its deterministic implementation (on the CPU the serial
accumulation; on CUDA sort-based scatters and a fixed cuBLAS workspace) or raises if it has none, and
memory from ``torch.empty`` is filled, so a kernel that reads what it never wrote reads the same thing.

Not covered: another thread count, another machine or another library build change the order of
reductions inside matmuls, and so the bits. The measured cost is in the README ("Resuming").
"""

from __future__ import annotations

import os

import torch


def apply_determinism(enabled: bool) -> None:
    """Make the ops a run uses deterministic (called once per process, before the model is built)."""
    if not enabled:
        return
    # NOTE: cuBLAS reads this when it creates its first handle, so setting it before the model is built
    # is early enough; without it deterministic mode raises at the first matmul on a GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
