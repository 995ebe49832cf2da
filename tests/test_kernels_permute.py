"""Routing-map, permute and unpermute kernels vs their PyTorch references, forward and backward.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), so shapes stay small; `gpu`-marked tests rerun them natively.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.kernels.permute import (
    permute,
    permute_reference,
    routing_map,
    routing_map_reference,
    unpermute,
    unpermute_reference,
)
from moetrain.kernels.runtime import triton_available

requires_triton = pytest.mark.skipif(
    not triton_available(), reason="Triton cannot run: no CUDA and TRITON_INTERPRET unset at import"
)
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_expert_ids(num_tokens: int, num_experts: int, k: int, kind: str, seed: int = 0, device="cpu"):
    """Expert ids [T, K] for a routing distribution.

    uniform: k distinct random experts per token; zipf: distinct experts drawn with weights 1/rank
    (a hot expert 0, a long cold tail); one: every slot of every token on expert 3 (duplicates within
    a token too); few: only experts 0..k-1 are used, the rest are empty.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "one":
        return torch.full((num_tokens, k), 3, dtype=torch.int64, device=device)
    if kind == "few":
        return torch.stack([torch.randperm(k, generator=g) for _ in range(num_tokens)]).to(device)
    weights_E = torch.ones(num_experts) if kind == "uniform" else 1.0 / torch.arange(1, num_experts + 1)
    ids_TK = torch.multinomial(weights_E.expand(num_tokens, -1), k, replacement=False, generator=g)
    return ids_TK.to(device)


# ------------------------------------------------------------------------------------ routing map


@requires_triton
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one", "few"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.3])
@pytest.mark.parametrize(
    "num_tokens,num_experts,k",
    # 600 x 2 slots span two blocks of the E=8 kernel (1024 slots); 130 x 8 span nine of E=64's 128.
    [(1, 8, 1), (37, 8, 2), (600, 8, 2), (130, 64, 8), (50, 16, 3)],
)
def test_routing_map_matches_reference(num_tokens, num_experts, k, capacity_factor, kind):
    ids_TK = make_expert_ids(num_tokens, num_experts, k, kind, seed=num_tokens + k)
    capacity = None if capacity_factor is None else max(1, math.ceil(capacity_factor * ids_TK.numel() / num_experts))
    rows_TK, counts_E = routing_map(ids_TK, num_experts, capacity)
    ref_rows_TK, ref_counts_E = routing_map_reference(ids_TK, num_experts, capacity)
    assert rows_TK.dtype == torch.int64 and counts_E.dtype == torch.int64
    assert torch.equal(rows_TK, ref_rows_TK)
    assert torch.equal(counts_E, ref_counts_E)
    kept = rows_TK[rows_TK >= 0]
    assert torch.equal(kept.sort().values, torch.arange(int(counts_E.sum())))  # packed, each row once


def test_routing_map_worked_example():
    # Tokens 0..3 pick (1,0), (1,2), (0,1), (1,0); E=3. Expert 0's rows 0-2 in token order, expert 1's
    # rows 3-6, expert 2's row 7. With capacity 2, token 3's slots and token 2's slot on expert 1 drop.
    ids_TK = torch.tensor([[1, 0], [1, 2], [0, 1], [1, 0]])
    for fn in (routing_map, routing_map_reference):
        rows_TK, counts_E = fn(ids_TK, 3)
        assert rows_TK.tolist() == [[3, 0], [4, 7], [1, 5], [6, 2]] and counts_E.tolist() == [3, 4, 1]
        rows_TK, counts_E = fn(ids_TK, 3, 2)
        assert rows_TK.tolist() == [[2, 0], [3, 4], [1, -1], [-1, -1]] and counts_E.tolist() == [2, 2, 1]


# ----------------------------------------------------------------------------- permute / unpermute


def _permute_losses(fn_permute, fn_unpermute, x_TD, y_ND, gates_TK, rows_TK, w_ND, w_TD):
    x_TD = x_TD.detach().clone().requires_grad_(True)
    y_ND = y_ND.detach().clone().requires_grad_(True)
    gates_TK = gates_TK.detach().clone().requires_grad_(True)
    x_ND = fn_permute(x_TD, rows_TK)
    out_TD = fn_unpermute(y_ND, rows_TK, gates_TK)
    (grad_x_TD,) = torch.autograd.grad((x_ND.float() * w_ND).sum(), x_TD)
    grad_y_ND, grad_gates_TK = torch.autograd.grad((out_TD.float() * w_TD).sum(), (y_ND, gates_TK))
    return x_ND, out_TD, grad_x_TD, grad_y_ND, grad_gates_TK


def _check_permute(num_tokens, dim, k, num_experts, kind, capacity, dtype, device="cpu"):
    g = torch.Generator().manual_seed(num_tokens * 7 + dim + k)
    ids_TK = make_expert_ids(num_tokens, num_experts, k, kind, seed=num_tokens, device=device)
    rows_TK, _ = routing_map_reference(ids_TK, num_experts, capacity)
    x_TD = torch.randn(num_tokens, dim, generator=g).to(device, dtype)
    y_ND = torch.randn(num_tokens * k, dim, generator=g).to(device, dtype)
    gates_TK = torch.rand(num_tokens, k, generator=g).to(device)
    w_ND = torch.randn(num_tokens * k, dim, generator=g).to(device)
    w_TD = torch.randn(num_tokens, dim, generator=g).to(device)
    got = _permute_losses(permute, unpermute, x_TD, y_ND, gates_TK, rows_TK, w_ND, w_TD)
    # NOTE: the oracle is the reference run in fp32 on the same (bf16-representable) inputs; the
    # kernels accumulate in fp32, so in bf16 they differ from the oracle by the final rounding only.
    ref = _permute_losses(
        permute_reference, unpermute_reference, x_TD.float(), y_ND.float(), gates_TK, rows_TK, w_ND, w_TD
    )
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert torch.equal(got[0].float(), ref[0])  # permute is a copy: exact, unused rows zero
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for got_t, ref_t in zip(got[1:4], ref[1:4]):
        torch.testing.assert_close(got_t.float(), ref_t, **tol)
    torch.testing.assert_close(got[4], ref[4], **(tol if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("kind", ["uniform", "one", "few"])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens", [37, 70])
def test_permute_unpermute_match_reference(num_tokens, k, kind, capacity, dtype):
    # D=48: one 64-wide column block and 64 tokens per program; 37 and 70 leave a partial block.
    _check_permute(num_tokens, 48, k, 16, kind, capacity, dtype)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity", [None, 3])
def test_permute_unpermute_wide_rows(capacity, dtype):
    # D=1100: two 1024-wide column blocks (the second partial), 4 tokens per program, 9 tokens.
    _check_permute(9, 1100, 2, 8, "uniform", capacity, dtype)


@requires_triton
def test_unpermute_sums_each_token_in_slot_order():
    """Determinism that can break in the interpreter too: the combine adds a token's k rows in slot
    order, in fp32, one program per token (no atomics). A scatter-add over the permuted rows would add
    them in expert order instead: with terms of very different magnitudes the bits differ.

    fp32 only: the order is the same in every dtype, and Triton's interpreter rounds fp32 -> bf16 by
    truncation where the GPU rounds to nearest even, so a bf16 output is not bitwise comparable here."""
    dtype = torch.float32
    ids_TK = make_expert_ids(200, 8, 4, "uniform")
    rows_TK, _ = routing_map(ids_TK, 8)
    g = torch.Generator().manual_seed(5)
    y_ND = (torch.randn(800, 96, generator=g) * 10.0 ** torch.randint(-6, 7, (800, 1), generator=g)).to(dtype)
    gates_TK = torch.rand(200, 4, generator=g)
    acc_TD = torch.zeros(200, 96)
    for j in range(4):  # the promised order: slot 0, 1, 2, 3, each term and sum rounded in fp32
        acc_TD = acc_TD + y_ND[rows_TK[:, j]].float() * gates_TK[:, j : j + 1]
    got = unpermute(y_ND, rows_TK, gates_TK)
    assert torch.equal(got, acc_TD.to(dtype))
    in_expert_order = torch.zeros(200, 96)
    slots = rows_TK.argsort(dim=1)  # the order of the rows in the permuted buffer: by expert
    for j in range(4):
        r = rows_TK.gather(1, slots[:, j : j + 1])[:, 0]
        in_expert_order = in_expert_order + y_ND[r].float() * gates_TK.gather(1, slots[:, j : j + 1])
    assert not torch.equal(in_expert_order.to(dtype), acc_TD.to(dtype))  # the order is observable here


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,d", [(2, 128), (2, 512), (3, 40), (8, 256)])
def test_unpermute_reference_gradients_match_the_plain_sum(k, d, dtype):
    """The CPU combine (torch.bmm where it runs BLAS, else ``_WeightedSum``: the parameters reach both) against
    ``sum_k w * y`` in fp64 through autograd, with dropped slots."""
    g = torch.Generator().manual_seed(k * d)
    ids_TK = make_expert_ids(64, 8, k, "zipf")
    rows_TK, _ = routing_map_reference(ids_TK, 8, capacity=max(1, 64 * k // 16))
    assert (rows_TK < 0).any()
    y_ND = torch.randn(64 * k, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    gates_TK = torch.rand(64, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    grad_TD = torch.randn(64, d, generator=g, dtype=torch.float64).to(dtype)

    def plain(y, gates):
        w_TK = torch.where(rows_TK >= 0, gates, 0).double()
        return sum(y.double()[rows_TK[:, j].clamp_min(0)] * w_TK[:, j : j + 1] for j in range(k))

    got = unpermute_reference(y_ND, rows_TK, gates_TK)
    want = plain(y_ND, gates_TK)
    got_grads = torch.autograd.grad(got, (y_ND, gates_TK), grad_TD)
    want_grads = torch.autograd.grad(want, (y_ND, gates_TK), grad_TD.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * b.abs().max().item())


def test_no_tokens():
    rows_TK, counts_E = routing_map(torch.zeros(0, 2, dtype=torch.int64), 4)
    assert rows_TK.shape == (0, 2) and counts_E.tolist() == [0, 0, 0, 0]
    assert permute(torch.zeros(0, 8), rows_TK).shape == (0, 8)
    assert unpermute(torch.zeros(0, 8), rows_TK, torch.zeros(0, 2)).shape == (0, 8)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (128, 8)])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one"])
def test_routing_and_permute_native_gpu(num_experts, k, kind, dtype):
    ids_TK = make_expert_ids(4096 + 3, num_experts, k, kind, device="cuda")
    for capacity in (None, 4096 * k // num_experts):
        rows_TK, counts_E = routing_map(ids_TK, num_experts, capacity)
        ref_rows_TK, ref_counts_E = routing_map_reference(ids_TK, num_experts, capacity)
        assert torch.equal(rows_TK, ref_rows_TK) and torch.equal(counts_E, ref_counts_E)
    _check_permute(4096 + 3, 1024 + 64, k, num_experts, kind, None, dtype, device="cuda")
    _check_permute(1000, 4096, k, num_experts, kind, 1000 * k // num_experts, dtype, device="cuda")
