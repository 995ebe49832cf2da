"""Local dispatcher: permute -> unpermute is the identity; capacity drops are counted."""

import pytest
import torch

from moetrain.kernels import select_backend
from moetrain.moe.dispatch import LocalDispatcher, expert_capacity
from moetrain.moe.routers.base import RoutingDecision


def _decision(ids, gates=None):
    ids = torch.tensor(ids)
    gates = torch.ones(ids.shape) if gates is None else torch.tensor(gates)
    return RoutingDecision(ids, gates, torch.zeros(()))


@pytest.mark.parametrize("k", [1, 2])
def test_permute_unpermute_identity(k):
    torch.manual_seed(0)
    T, E, D = 13, 4, 6
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    x = torch.randn(T, D)
    disp = LocalDispatcher(E, None, select_backend("torch"))
    gates = torch.full((T, k), 1.0 / k)
    x_ND, counts, meta = disp.dispatch(x, RoutingDecision(ids, gates, torch.zeros(())))
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    # rows are grouped by expert, in expert order
    starts = torch.cumsum(counts, 0) - counts
    for t in range(T):
        for j in range(k):
            e = ids[t, j].item()
            row = meta.rows_TK[t, j].item()
            assert starts[e] <= row < starts[e] + counts[e]
            assert torch.equal(x_ND[row], x[t])
    assert torch.allclose(disp.combine(x_ND, meta), x, atol=1e-6)


def test_capacity_drops_are_counted_and_pass_through_as_zero():
    # 6 tokens all to expert 0 with 2 experts, k=1, capacity factor 1 -> capacity ceil(6/2)=3.
    assert expert_capacity(6, 2, 1.0) == 3
    disp = LocalDispatcher(2, 1.0, select_backend("torch"))
    x = torch.arange(12, dtype=torch.float32).view(6, 2)
    x_ND, counts, meta = disp.dispatch(x, _decision([[0]] * 6))
    assert counts.tolist() == [3, 0]
    assert meta.dropped.item() == 3
    assert meta.rows_TK.flatten().tolist() == [0, 1, 2, -1, -1, -1]  # earlier tokens win
    out = disp.combine(x_ND, meta)
    assert torch.equal(out[:3], x[:3]) and torch.equal(out[3:], torch.zeros(3, 2))


def test_gradients_flow_through_dispatch_and_gates():
    x = torch.randn(5, 3, requires_grad=True)
    gates = torch.rand(5, 2, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    disp = LocalDispatcher(3, None, select_backend("torch"))
    x_ND, _, meta = disp.dispatch(x, RoutingDecision(ids, gates, torch.zeros(())))
    out = disp.combine(x_ND * 2.0, meta)
    out.sum().backward()
    assert torch.allclose(x.grad, 2.0 * gates.sum(-1, keepdim=True).expand(5, 3).detach())
    assert torch.allclose(gates.grad, 2.0 * x.sum(-1, keepdim=True).expand(5, 2).detach())
