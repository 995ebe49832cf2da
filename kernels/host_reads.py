"""A marker for code that reads a tensor's values on the host where that costs no device sync.

On a GPU, ``tensor.tolist()`` of a CUDA tensor waits for the device; the MoE hot path avoids it, and the
tests count every such read (``tests/host_sync.py``). Code that only ever runs on the CPU (e.g. the CPU
experts' per-expert weight gradients, ``moetrain/moe/grouped_cpu.py``) may read CPU tensors inside
:func:`cpu_host_read`: the host-sync counter does not count reads there, and raises if one of them is of a
tensor that is not on the CPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


@contextlib.contextmanager
def cpu_host_read() -> Iterator[None]:
    """Reads of CPU tensors' values inside are host memory reads, not device syncs."""
    _state.active = True
    try:
        yield
    finally:
        _state.active = False


def in_cpu_host_read() -> bool:
    return getattr(_state, "active", False)
