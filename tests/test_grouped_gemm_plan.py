"""The grouped-GEMM decision table (``moetrain/moe/grouped_gemm.py``), row by row, and the Blackwell guard
that zeroes the weight gradients of experts without rows."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.experts import grouped_matmul
from moetrain.moe.grouped_gemm import ZeroEmptyExpertGrads, plan_for, torch_version

BF16, FP32, FP16 = torch.bfloat16, torch.float32, torch.float16
# (device, capability, dtype, torch, has _grouped_mm) -> (grouped, zero empty experts' grads, host sync)
TABLE = [
    ("cpu", None, FP32, (2, 13), True, (True, False, False)),
    ("cpu", None, BF16, (2, 13), True, (True, False, False)),
    ("cpu", None, FP16, (2, 13), True, (False, False, True)),
    ("cpu", None, FP32, (2, 4), False, (False, False, True)),
    ("cuda", (9, 0), BF16, (2, 8), True, (True, False, False)),  # Hopper: the fast path
    ("cuda", (9, 0), BF16, (2, 13), True, (True, False, False)),
    ("cuda", (9, 0), FP32, (2, 13), True, (False, False, True)),  # CUDA kernels are bf16
    ("cuda", (9, 0), FP16, (2, 13), True, (False, False, True)),
    ("cuda", (10, 0), BF16, (2, 8), True, (False, False, True)),  # torch 2.8: Hopper only
    ("cuda", (10, 0), BF16, (2, 9), True, (True, True, False)),  # Blackwell: guard empty experts
    ("cuda", (10, 3), BF16, (2, 13), True, (True, True, False)),
    ("cuda", (8, 0), BF16, (2, 8), True, (False, False, True)),  # Ampere, old torch: our loop
    ("cuda", (8, 0), BF16, (2, 9), True, (True, False, True)),  # Ampere: torch's fallback, which syncs
    ("cuda", (12, 0), BF16, (2, 13), True, (True, False, True)),  # consumer Blackwell: torch's fallback
    ("cuda", (7, 5), BF16, (2, 13), True, (False, False, True)),
    ("cuda", (9, 0), BF16, (2, 7), False, (False, False, True)),
]


@pytest.mark.parametrize("device,capability,dtype,version,has,expected", TABLE)
def test_decision_table(device, capability, dtype, version, has, expected):
    plan = plan_for(device, capability, dtype, version, has)
    assert (plan.grouped, plan.zero_empty_expert_grads, plan.host_sync) == expected
    assert plan.why if plan.host_sync else not plan.why  # a slow path always says why


def test_torch_version_parses_local_builds():
    assert torch_version("2.13.0+cpu") == (2, 13) and torch_version("2.9.1") == (2, 9)
    assert torch_version("2.10.0a0+git1234") == (2, 10)


class LeakyGroupedMM(torch.autograd.Function):
    """torch._grouped_mm whose weight gradient is off by 1 everywhere, empty groups included: what
    Blackwell's kernel does to the groups without rows (pytorch/pytorch#172439)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        grad_w = torch._grouped_mm(x.t().contiguous(), grad.contiguous(), offs=offs) + 1.0
        return torch._grouped_mm(grad.contiguous(), w.transpose(-2, -1), offs=offs), grad_w, None


def test_the_guard_zeroes_exactly_the_empty_experts_gradients():
    """Behind the guard, experts without rows get exactly zero, the others what the kernel computed."""
    counts_L = torch.tensor([5, 0, 3, 0])
    ends_L = torch.cumsum(counts_L, 0).to(torch.int32)
    x_ND, w_LDF = torch.randn(8, 16), torch.randn(4, 16, 8, requires_grad=True)
    g_NF = torch.randn(8, 8)
    (LeakyGroupedMM.apply(x_ND, ZeroEmptyExpertGrads.apply(w_LDF, counts_L), ends_L) * g_NF).sum().backward()
    guarded, w_LDF.grad = w_LDF.grad, None
    (LeakyGroupedMM.apply(x_ND, w_LDF, ends_L) * g_NF).sum().backward()
    leaky = w_LDF.grad
    assert (leaky[1] != 0).all() and (leaky[3] != 0).all()  # the leak shows without the guard
    assert torch.equal(guarded[1], torch.zeros_like(guarded[1])) and torch.equal(
        guarded[3], torch.zeros_like(guarded[3])
    )
    assert torch.equal(guarded[0], leaky[0]) and torch.equal(guarded[2], leaky[2])


def test_grouped_matmul_applies_the_guard_where_the_plan_asks(monkeypatch):
    """The experts' matmul puts the guard in when the plan says so (forced here on the CPU)."""
    from moetrain.moe import experts
    from moetrain.moe.grouped_gemm import GroupedGemmPlan

    monkeypatch.setattr(experts, "plan_here", lambda x: GroupedGemmPlan(True, zero_empty_expert_grads=True))
    calls = []
    real = ZeroEmptyExpertGrads.apply
    monkeypatch.setattr(ZeroEmptyExpertGrads, "apply", lambda w, c: calls.append(c.tolist()) or real(w, c))
    w = torch.randn(3, 16, 8, requires_grad=True)
    y = grouped_matmul(torch.randn(4, 16), w, torch.tensor([4, 4, 4], dtype=torch.int32))
    (y * torch.randn_like(y)).sum().backward()
    assert calls == [[4, 0, 0]] and torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
