"""Grouped experts equal a per-expert loop, forward and backward."""

import copy

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
    y1 = ex.grouped_matmul(x1, w1, counts_L)
    y2 = ex.grouped_matmul_loop(x2, w2, counts_L)
    used = sum(counts)
    assert torch.allclose(y1[:used], y2[:used], atol=1e-5)
    g = torch.randn(n, 16)
    g[used:] = 0
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-4)
    assert torch.allclose(x1.grad[:used], x2.grad[:used], atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "stacked"])
def test_grouped_experts_equal_per_expert_modules(kind):
    """Each expert's rows computed by the stacked module equal that expert computed alone."""
    torch.manual_seed(1)
    m = ex.GroupedExperts(kind, num_experts=3, d_model=8, d_hidden=16, sublayers=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8, requires_grad=True)
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


def test_stacked_experts_start_as_identity():
    m = ex.GroupedExperts("stacked", num_experts=2, d_model=4, d_hidden=8, sublayers=3)
    x = torch.randn(3, 4)
    assert torch.equal(m(x, torch.tensor([1, 2])), torch.zeros(3, 4))


def test_row_experts_without_sync():
    assert ex.row_experts(torch.tensor([2, 0, 1]), 4).tolist() == [0, 0, 2, 2]


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
