"""The CPU experts' weight gradients in kept buffers (moetrain/moe/grouped_cpu.py): the same gradients
as ``torch._grouped_mm``'s backward, memory reused across steps, and never a gradient the caller
still holds overwritten."""

import pytest
import torch
from host_sync import HostSyncCounter

from moetrain.kernels.host_reads import cpu_host_read
from moetrain.moe import experts as ex
from moetrain.moe.grouped_cpu import GradBuffers, grouped_mm_cpu


def _grouped_reference(x, ws, counts):
    """torch._grouped_mm with its own autograd: outputs and every gradient."""
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    ends = ex.group_ends(counts)
    ys = [torch._grouped_mm(x, w, offs=ends) for w in ws]
    return x, ws, ys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 8], [4, 4, 0]])
def test_two_weights_match_grouped_mm(dtype, counts):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    x = torch.randn(8, 16, dtype=dtype)
    ws = [torch.randn(3, 16, 32, dtype=dtype) for _ in range(2)]
    gs = [torch.randn(8, 32, dtype=dtype) for _ in range(2)]
    xr, wr, yr = _grouped_reference(x, ws, counts)
    sum((y * g).sum() for y, g in zip(yr, gs)).backward()
    xg = x.clone().requires_grad_()
    wg = [w.clone().requires_grad_() for w in ws]
    yg = grouped_mm_cpu(xg, wg, ex.group_ends(counts), [GradBuffers(), GradBuffers()])
    sum((y * g).sum() for y, g in zip(yg, gs)).backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for a, b in zip(yg, yr):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(xg.grad, xr.grad, **tol)
    for a, b in zip(wg, wr):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def _experts_step(m, x, counts):
    m(x, counts).square().sum().backward()


def test_the_gradient_memory_is_reused_when_nothing_holds_it():
    torch.manual_seed(0)
    m = ex.GroupedExperts("swiglu", num_experts=4, d_model=16, d_hidden=32)
    x, counts = torch.randn(12, 16), torch.tensor([5, 0, 4, 3])
    _experts_step(m, x, counts)
    first = {n: p.grad.untyped_storage().data_ptr() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    _experts_step(m, x, counts)
    assert {n: p.grad.untyped_storage().data_ptr() for n, p in m.named_parameters()} == first


def test_a_gradient_the_caller_keeps_is_never_overwritten():
    torch.manual_seed(0)
    m = ex.GroupedExperts("gelu", num_experts=4, d_model=16, d_hidden=32)
    counts = torch.tensor([5, 0, 4, 3])
    _experts_step(m, torch.randn(12, 16), counts)
    kept = {n: p.grad for n, p in m.named_parameters()}
    copies = {n: g.clone() for n, g in kept.items()}
    for _ in range(3):  # a third buffer is never made: the kept one is skipped, the other reused
        m.zero_grad(set_to_none=True)
        _experts_step(m, torch.randn(12, 16), counts)
    for n, g in kept.items():
        assert torch.equal(g, copies[n]), n
        assert m.get_parameter(n).grad.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()


def test_gradients_accumulate_over_micro_batches():
    """Without zero_grad the second backward adds into .grad, which holds the first buffer."""
    torch.manual_seed(0)
    m = ex.GroupedExperts("swiglu", num_experts=4, d_model=16, d_hidden=32)
    counts = torch.tensor([5, 0, 4, 3])
    xs = [torch.randn(12, 16) for _ in range(3)]
    singles = []
    for x in xs:
        m.zero_grad(set_to_none=True)
        _experts_step(m, x, counts)
        singles.append({n: p.grad.clone() for n, p in m.named_parameters()})
    m.zero_grad(set_to_none=True)
    for x in xs:
        _experts_step(m, x, counts)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, sum(s[n] for s in singles), msg=n)


def test_the_cpu_path_counts_no_host_sync():
    m = ex.GroupedExperts("swiglu", num_experts=4, d_model=16, d_hidden=32)
    x = torch.randn(12, 16, requires_grad=True)
    with HostSyncCounter() as syncs:
        _experts_step(m, x, torch.tensor([5, 0, 4, 3]))
    assert syncs.count == 0, syncs.report()


def test_cpu_host_read_is_not_counted_but_a_plain_read_is():
    t = torch.arange(3)
    with HostSyncCounter() as syncs:
        with cpu_host_read():
            t.tolist()
        t.tolist()
    assert syncs.count == 1
