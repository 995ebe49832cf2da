"""When the experts may use ``torch._grouped_mm``, and what each device needs guarded: one decision table.

What is known of ``torch._grouped_mm`` (each row has its source; the table is tested row by row in
``tests/test_grouped_gemm_plan.py``):

- CPU, fp32 or bf16: supported (the operands' inner dims 16-byte aligned); gradients of an expert
  without rows are zero.
- CUDA, compute capability 9.x (Hopper), bf16: the fast path since torch 2.8 (torch 2.8 admits major 9
  only).
- CUDA 10.x (Blackwell datacenter), bf16: the fast path since torch 2.9; its weight gradient of an expert
  that got no rows is *not* zero (pytorch/pytorch#172439, open as of 2026-08): moetrain zeroes those
  gradients itself (:class:`ZeroEmptyExpertGrads`), on the device, without a host sync.
- CUDA 8.x (Ampere), 11.x and 12.x, bf16, torch >= 2.9: torch runs its own per-expert fallback, which
  reads the group sizes on the host (one sync per call; pytorch/pytorch#186615, #194227). Used, with the
  sync reported, since moetrain's own loop syncs too.
- fp16 and fp32 on CUDA, older GPUs or torch: moetrain's per-expert loop (one host sync per call).

Every path leaves the rows after the last group end unwritten (forward output and input gradient alike,
pytorch/pytorch#193633): moetrain never reads them (``moetrain/moe/experts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupedGemmPlan:
    grouped: bool  # torch._grouped_mm; else moetrain's per-expert loop
    zero_empty_expert_grads: bool = False  # the kernel's weight gradient of an expert without rows is garbage
    host_sync: bool = False  # the path reads the group sizes on the host
    why: str = ""  # what a user is told when the plan is not the fast path


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def plan_for(
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    version: tuple[int, int],
    has_grouped_mm: bool,
) -> GroupedGemmPlan:
    """The decision table (module docstring). ``capability``: CUDA compute capability, None elsewhere."""
    loop = "the experts run as a per-expert loop with one host sync per matmul"
    if not has_grouped_mm:
        return GroupedGemmPlan(
            False, host_sync=True, why=f"torch {version[0]}.{version[1]} has no torch._grouped_mm; {loop}"
        )
    if device_type != "cuda":
        if dtype in (torch.float32, torch.bfloat16):
            return GroupedGemmPlan(True)
        return GroupedGemmPlan(
            False, host_sync=True, why=f"on {device_type} it needs fp32 or bf16 (got {dtype}); {loop}"
        )
    major = capability[0] if capability else 0
    if dtype != torch.bfloat16:
        return GroupedGemmPlan(False, host_sync=True, why=f"its CUDA kernels are bf16 (got {dtype}); {loop}")
    if major == 9:
        return GroupedGemmPlan(True)
    if version < (2, 9):
        return GroupedGemmPlan(
            False, host_sync=True, why=f"torch {version[0]}.{version[1]} runs it on compute capability 9.x only; {loop}"
        )
    if major == 10:
        return GroupedGemmPlan(True, zero_empty_expert_grads=True)
    if major >= 8:
        return GroupedGemmPlan(
            True,
            host_sync=True,
            why=f"on compute capability {major}.x torch's grouped GEMM is a per-expert fallback that reads the "
            "group sizes on the host (one sync per call)",
        )
    return GroupedGemmPlan(False, host_sync=True, why=f"compute capability {major}.x is below 8.0; {loop}")


def plan_here(x: torch.Tensor) -> GroupedGemmPlan:
    """:func:`plan_for` for ``x``'s device and dtype on this torch."""
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    return plan_for(x.device.type, capability, x.dtype, torch_version(), hasattr(torch, "_grouped_mm"))


class ZeroEmptyExpertGrads(torch.autograd.Function):
    """Identity on a stacked expert weight ``w_LDF`` whose backward zeroes the gradient of every expert
    that got no rows (``counts_L == 0``): a mask multiply on the device, no host sync. Guards kernels whose
    weight gradient of an empty group is not zero (Blackwell, see the module docstring)."""

    @staticmethod
    def forward(ctx, w_LDF: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(counts_L)
        return w_LDF.view_as(w_LDF)

    @staticmethod
    def backward(ctx, grad_LDF: torch.Tensor):
        (counts_L,) = ctx.saved_tensors
        keep_L11 = (counts_L > 0).to(grad_LDF.dtype).view(-1, *([1] * (grad_LDF.dim() - 1)))
        return grad_LDF * keep_L11, None
