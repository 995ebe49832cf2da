"""Fused MoE kernels, installed as ``moetrain.kernels``.

Every op has a plain PyTorch ``*_reference`` (the CPU path and the test oracle) beside its Triton
kernel. :func:`select_backend` chooses once, from the ``kernels: auto | triton | torch`` config value,
and the MoE layer calls the ops through the returned :class:`KernelBackend`.
"""

from moetrain.kernels.backend import KernelBackend, select_backend

__all__ = ["KernelBackend", "select_backend"]
