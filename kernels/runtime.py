"""The one place that knows whether Triton is installed and where it can run.

``triton`` / ``tl`` are the real modules when Triton is installed. Without it they are stand-ins that
let the kernel files define their ``@triton.jit`` functions (which are then never launched), so the
PyTorch references stay importable on a CPU-only install, where Triton is not a requirement.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

# NOTE: read once. ``triton.jit`` decides at decoration time (when the kernel files are imported)
# whether it builds an interpreted or a compiled kernel, so a later change of the variable would
# not be seen by the kernels anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _Missing:
    """Stand-in for ``triton`` and ``triton.language`` when Triton is not installed."""

    constexpr = Any
    float32 = int32 = int64 = None

    @staticmethod
    def jit(fn: Callable | None = None, **_: Any) -> Callable:
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()


if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only on installs without triton
    triton = tl = _Missing()  # type: ignore[assignment]


def triton_available() -> bool:
    """Triton can run here: installed, and a CUDA device or the CPU interpreter is present."""
    return HAS_TRITON and (torch.cuda.is_available() or INTERPRET)


def runs_on_triton(t: torch.Tensor) -> bool:
    """Whether a tensor can be handed to a Triton kernel: on CUDA, or anywhere under the interpreter.

    NOTE: the Triton entry points fall back to the reference for tensors that fail this (a CPU model
    on a GPU machine), so ``kernels: auto`` picking Triton never breaks CPU-resident modules.
    """
    return HAS_TRITON and (t.is_cuda or INTERPRET)
