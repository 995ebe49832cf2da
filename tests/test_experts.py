"""Grouped experts equal a per-expert loop, forward and backward."""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from moetrain.moe import experts as ex


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [10, 0, 0, 0], [0, 0, 0, 0]])
def test_grouped_matmul_equals_loop(counts):
    torch.manual_seed(0)
    counts_L = torch.tensor(counts)
    n = max(sum(counts), 1)
    x1 = torch.randn(n, 8, requires_grad=True)
    w1 = torch.randn(4, 8, 16, requires_grad=True)
    x2, w2 = x1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    assert ex.grouped_mm_unsupported(x1, w1) is None  # the fused path is what we compare
    y1 = ex.grouped_matmul(x1, w1, ex.group_ends(counts_L))
    y2 = ex.grouped_matmul_loop(x2, w2, counts_L)
    used = sum(counts)
    assert torch.allclose(y1[:used], y2[:used], atol=1e-5)
    g = torch.randn(n, 16)
    g[used:] = 0
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-4)
    assert torch.allclose(x1.grad[:used], x2.grad[:used], atol=1e-5)


def _random_experts(kind: str, seed: int):
    """3 experts with random weights (expert 1 gets no rows), their counts and 5 input rows."""
    torch.manual_seed(seed)
    m = ex.GroupedExperts(kind, num_experts=3, d_model=8, d_hidden=16, sublayers=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m, torch.tensor([2, 0, 3]), torch.randn(5, 8, requires_grad=True)


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "stacked"])
def test_grouped_experts_equal_per_expert_modules(kind):
    """Each expert's rows computed by the stacked module equal that expert computed alone."""
    m, counts, x = _random_experts(kind, seed=1)
    y = m(x, counts)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ys, start = [], 0
    for e, c in enumerate(counts.tolist()):
        one = torch.tensor([c if i == e else 0 for i in range(3)])
        # the same rows fed alone to expert e (other experts empty)
        ys.append(m(x2[start : start + c], one) if c else x2[:0])
        start += c
    y2 = torch.cat(ys)
    y2.square().sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-4), n


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "stacked"])
def test_a_plain_sum_backpropagates(kind):
    """``experts(x, counts).sum().backward()`` hands torch's grouped GEMM a stride-0 gradient, which
    its backward rejects; the experts make it contiguous and give the loop's gradients."""
    m, counts, x = _random_experts(kind, seed=2)
    m(x, counts).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    m(x2, counts).clone(memory_format=torch.contiguous_format).mul(1.0).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_stacked_experts_start_as_identity():
    m = ex.GroupedExperts("stacked", num_experts=2, d_model=4, d_hidden=8, sublayers=3)
    x = torch.randn(3, 4)
    assert torch.equal(m(x, torch.tensor([1, 2])), torch.zeros(3, 4))


def test_row_experts_without_sync():
    """Rows past the last expert get L: the zero scratch entry of ``per_row``."""
    ends = ex.group_ends(torch.tensor([2, 0, 1]), padded=True)
    assert ends.tolist() == [2, 2, 3]
    assert ex.row_experts(ends, 5).tolist() == [0, 0, 2, 3, 3]
    # nothing kept at all: expert 0 computes row 0, so the combine never reads uninitialised memory
    assert ex.group_ends(torch.tensor([0, 0]), padded=True).tolist() == [1, 1]
    assert ex.group_ends(torch.tensor([0, 0])).tolist() == [0, 0]


def test_padded_rows_never_poison_outputs_or_gradients():
    """Capacity mode leaves rows past counts.sum(); even NaN there must not reach weights or outputs."""
    counts = torch.tensor([2, 1])
    x = torch.randn(5, 8)
    x[3:] = float("nan")
    x.requires_grad_()
    for kind in ("gelu", "stacked"):
        m = ex.GroupedExperts(kind, num_experts=2, d_model=8, d_hidden=16, sublayers=2)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(std=0.3)
        y = m(x, counts, padded=True)
        assert torch.isfinite(y[:3]).all()
        y[:3].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters()), kind


def test_fallback_to_the_loop_warns_once_and_is_recorded():
    """float64 has no grouped GEMM: the experts still compute the right thing, say so once, and record it."""
    torch.manual_seed(0)
    m = ex.GroupedExperts("gelu", num_experts=2, d_model=8, d_hidden=16)
    counts_L = torch.tensor([3, 2])
    x = torch.randn(5, 8)
    m(x, counts_L)
    assert not m.uses_loop  # fp32 on the CPU: torch._grouped_mm
    m.double()
    with pytest.warns(RuntimeWarning, match="grouped GEMM unavailable") as record:
        y = m(x.double(), counts_L)
        m(x.double(), counts_L)
    assert len(record) == 1 and m.uses_loop
    ref = torch.cat(
        [
            F.gelu(x.double()[:3] @ m.w1_SLDF[0, 0]) @ m.w2_SLFD[0, 0],
            F.gelu(x.double()[3:] @ m.w1_SLDF[0, 1]) @ m.w2_SLFD[0, 1],
        ]
    )
    torch.testing.assert_close(y, ref)


def test_shard_keeps_each_global_expert_exactly():
    torch.manual_seed(0)
    whole = ex.GroupedExperts("swiglu", num_experts=4, d_model=8, d_hidden=16)
    for rank in range(2):
        part = copy.deepcopy(whole)
        part.shard(rank, 2)
        assert (part.first_expert, part.num_local) == (2 * rank, 2)
        for (name, p), (_, q) in zip(whole.named_parameters(), part.named_parameters()):
            assert torch.equal(q, p[:, 2 * rank : 2 * rank + 2]), name
    with pytest.raises(RuntimeError, match="already sharded"):
        part.shard(0, 2)


class PoisonUnusedRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Makes ``torch._grouped_mm`` fill the rows it leaves uninitialised (past the last offset) with NaN,
    forward and backward: the worst case of what the fused kernel may return there."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._grouped_mm.default:
            a, b = args[0], args[1]
            offs = (kwargs or {}).get("offs", args[2] if len(args) > 2 else None)
            if a.dim() == 2 and b.dim() == 3 and offs is not None:  # rows of `a` split by offs
                out[offs[-1].item() :] = float("nan")
        return out


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "stacked"])
@pytest.mark.parametrize("counts", [[2, 0, 1], [0, 0, 0]])
def test_capacity_rows_need_no_masking(kind, counts, monkeypatch):
    """Rows of no expert are not computed and not masked; with NaN in them (the fused kernel's
    uninitialised memory) the kept rows' outputs and every weight and input gradient of the layer
    through the combine equal the per-expert loop, which zero-fills them."""
    from moetrain.kernels.permute import permute_reference, unpermute_reference

    torch.manual_seed(0)
    m = ex.GroupedExperts(kind, num_experts=3, d_model=8, d_hidden=16, sublayers=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    counts_L = torch.tensor(counts)
    # 4 tokens x 2 slots; kept slots get rows 0..used-1 in expert order, the rest are dropped (-1)
    used = sum(counts)
    rows_TK = torch.full((4, 2), -1)
    rows_TK.view(-1)[torch.randperm(8)[:used]] = torch.arange(used)
    gates_TK = torch.rand(4, 2)
    x = torch.randn(4, 8)

    def run(poison: bool):
        m.zero_grad()
        x_TD = x.clone().requires_grad_()
        with PoisonUnusedRows() if poison else contextlib.nullcontext():
            y_ND = m(permute_reference(x_TD, rows_TK), counts_L, padded=True)
            out_TD = unpermute_reference(y_ND, rows_TK, gates_TK)
            out_TD.square().sum().backward()
        return out_TD.detach(), x_TD.grad, {n: p.grad.clone() for n, p in m.named_parameters()}

    got = run(True)
    assert not m.uses_loop  # the fused path, poisoned
    with monkeypatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mp.setattr(ex, "grouped_mm_unsupported", lambda x, w: "reference")  # the loop: zero-filled rows
        ref = run(False)
    assert m.uses_loop
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], atol=1e-5, rtol=1e-5, msg=n)


def _saved_storages(fn) -> dict[int, int]:
    """Distinct storages autograd saves while ``fn`` runs: data_ptr -> bytes."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("padded", [False, True])
def test_recomputed_input_saves_x_and_keeps_gradients(kind, padded):
    """With ``recompute_x`` the experts keep no x_ND for backward (it comes back from the callable) and
    every gradient equals torch._grouped_mm's own backward."""
    from moetrain.kernels.permute import permute_reference

    torch.manual_seed(0)
    m = ex.GroupedExperts(kind, num_experts=3, d_model=8, d_hidden=16)
    counts = torch.tensor([3, 0, 2]) if padded else torch.tensor([3, 0, 3])
    rows_TK = torch.tensor([[0, 3], [1, -1], [4, 2], [-1, -1]]) if padded else torch.tensor([[0, 3], [1, 4], [5, 2]])
    x_TD = torch.randn(rows_TK.shape[0], 8)
    g = torch.randn(rows_TK.numel(), 8)
    results = []
    for recompute in (False, True):
        m.zero_grad()
        x = x_TD.clone().requires_grad_()
        calls = []

        def again(x=x, calls=calls):
            calls.append(1)
            return permute_reference(x.detach(), rows_TK)

        saved, y = _saved_storages(
            lambda x=x, again=again, recompute=recompute: m(
                permute_reference(x, rows_TK), counts, padded=padded, recompute_x=again if recompute else None
            )
        )
        used = int(counts.sum())
        (y[:used] * g[:used]).sum().backward()
        results.append((sum(saved.values()), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}, calls))
    (bytes_plain, gx0, gp0, _), (bytes_recomputed, gx1, gp1, calls) = results
    assert bytes_plain - bytes_recomputed == rows_TK.numel() * 8 * 4  # exactly x_ND
    assert len(calls) == 1  # once per backward: SwiGLU's W1 and W3 share the gathered rows
    torch.testing.assert_close(gx1, gx0)
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], msg=n)
