"""Choose the kernel backend once: Triton on CUDA, the PyTorch reference everywhere else.

``kernels: auto | triton | torch`` (MoEConfig) is resolved here, once per layer construction:

- ``auto``   -> ``triton`` when Triton is installed and CUDA is present, else ``torch``; never fails.
- ``triton`` -> the Triton entry points; an error unless Triton can run (CUDA, or the CPU
  interpreter ``TRITON_INTERPRET=1``, which is how the tests run the kernels without a GPU).
- ``torch``  -> the ``*_reference`` functions.

Both backends have the same contract and neither reads a value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from moetrain.kernels import gating, permute
from moetrain.kernels.runtime import HAS_TRITON, INTERPRET, triton_available

BackendName = Literal["auto", "triton", "torch"]

__all__ = ["BackendName", "KernelBackend", "select_backend", "triton_available"]


@dataclass(frozen=True)
class KernelBackend:
    """The ops the MoE layer calls; each is either the Triton launcher or the reference."""

    name: Literal["triton", "torch"]
    topk_gating: Callable
    routing_map: Callable
    permute: Callable
    unpermute: Callable


TRITON_BACKEND = KernelBackend("triton", gating.topk_gating, permute.routing_map, permute.permute, permute.unpermute)
TORCH_BACKEND = KernelBackend(
    "torch",
    gating.topk_gating_reference,
    permute.routing_map_reference,
    permute.permute_reference,
    permute.unpermute_reference,
)


def resolve_backend(name: str, has_triton: bool, has_cuda: bool, interpreter: bool) -> Literal["triton", "torch"]:
    """The decision table of ``kernels: auto | triton | torch`` (raises for a choice that cannot run).

    NOTE: ``auto`` does not pick Triton on a CPU machine even under ``TRITON_INTERPRET=1``: the
    interpreter is a test tool, orders of magnitude slower than the reference.
    """
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be one of auto, triton, torch; got {name!r}")
    if name == "auto":
        return "triton" if has_triton and has_cuda else "torch"
    if name == "triton" and not (has_triton and (has_cuda or interpreter)):
        why = "the triton package is not installed" if not has_triton else "there is no CUDA device"
        raise RuntimeError(
            f"kernels: 'triton' cannot run here ({why}; on CPU set TRITON_INTERPRET=1 to run the "
            "kernels in Triton's interpreter); use kernels: auto or torch"
        )
    return name


def select_backend(name: BackendName = "auto") -> KernelBackend:
    """Resolve ``name`` for this process (:func:`resolve_backend`) and return its ops."""
    chosen = resolve_backend(name, HAS_TRITON, torch.cuda.is_available(), INTERPRET)
    return TRITON_BACKEND if chosen == "triton" else TORCH_BACKEND
