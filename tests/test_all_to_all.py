"""The all-to-all dispatcher against the local one, including the edge cases that hang peers."""

import copy

import pytest
import torch
import torch.distributed as dist
from distributed import ExchangeRecorder, run_distributed

from moetrain.kernels import select_backend
from moetrain.moe.dispatch import LocalDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.routers.base import RoutingDecision
from moetrain.parallel.all_to_all import AllToAllDispatcher

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(120)]

E, D, F, T = 4, 8, 16, 8  # T*k divisible by E: 'balanced' is exactly balanced


def _inputs(world, k, routing):
    """Per-rank tokens, expert ids and gates, identical on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(world, T, D, generator=g)
    gates = torch.rand(world, T, k, generator=g)
    if routing == "uniform":
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(world * T)]).view(world, T, k)
    elif routing == "all_to_last_rank":  # every token to experts held by the last rank: others receive none
        ids = torch.full((world, T, k), E - 1)
        if k > 1:
            ids[..., 1] = E - 2
    elif routing == "balanced":  # each rank sends T*k/E slots to every expert
        ids = (torch.arange(T * k).view(T, k) % E).expand(world, T, k).clone()
    return x, ids, gates


def _check(rank, world, k, routing, capacity, overlap=False):
    backend = select_backend("torch")
    x_all, ids_all, gates_all = _inputs(world, k, routing)
    torch.manual_seed(1)
    experts = GroupedExperts("gelu", E, D, F)  # all experts; rank r uses its slice below
    L = E // world
    local = copy.deepcopy(experts)
    local.shard(rank, world)  # the same experts, this rank's share

    # EP path: this rank's tokens
    x = x_all[rank].clone().requires_grad_()
    gates = gates_all[rank].clone().requires_grad_()
    disp = AllToAllDispatcher(E, capacity, backend, dist.group.WORLD, overlap=overlap)
    decision = RoutingDecision(ids_all[rank], gates, torch.zeros(()))
    disp.observer = ExchangeRecorder()
    if overlap:  # the layer's call: own rows computed beside the exchanges
        out, meta = disp.run(x, decision, local)
        counts_L = torch.tensor([sum(meta.recv_splits)])  # rows received from the other ranks
    else:
        x_RD, counts_L, meta = disp.dispatch(x, decision)
        out = disp.combine(local(x_RD, counts_L), meta)
    out.square().sum().backward()

    # reference: one process, this rank's tokens, all experts
    xr = x_all[rank].clone().requires_grad_()
    gr = gates_all[rank].clone().requires_grad_()
    ref = LocalDispatcher(E, capacity, backend)
    x_ND, counts, m = ref.dispatch(xr, RoutingDecision(ids_all[rank], gr, torch.zeros(())))
    out_ref = ref.combine(experts(x_ND, counts), m)
    out_ref.square().sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5) and torch.allclose(gates.grad, gr.grad, atol=1e-5)
    # expert grads: the sum over ranks of the reference grads, restricted to my experts
    for (_, p_all), (_, p_loc) in zip(experts.named_parameters(), local.named_parameters()):
        full = p_all.grad.clone()
        dist.all_reduce(full)
        assert torch.allclose(p_loc.grad, full[:, rank * L : (rank + 1) * L], atol=1e-4)
    if routing == "all_to_last_rank" and (rank + 1) * L - 1 < E - k:  # holds none of the chosen experts
        assert counts_L.sum().item() == 0  # this rank received no tokens, and did not hang
    if routing == "balanced" and capacity is None:
        ideal = T * k * D * x.element_size() * (world - 1) / world
        assert disp.observer.sent == [ideal]


CASES = [(k, routing, None) for k in (1, 2) for routing in ("uniform", "all_to_last_rank", "balanced")]
CASES.append((2, "all_to_last_rank", 1.0))  # capacity mode: drops on the overloaded experts


def _check_all(rank, world):
    for k, routing, capacity in CASES:  # one set of processes for every case: spawning is the slow part
        _check(rank, world, k, routing, capacity)
        _check(rank, world, k, routing, capacity, overlap=True)


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_equals_local(world):
    """k = 1, 2; uniform, balanced, and every token to one rank (the others receive none); capacity;
    each with the exchanges in sequence and overlapped with the experts (``moe.ep_overlap``)."""
    run_distributed(_check_all, world)
