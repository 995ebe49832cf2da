"""Empty work through the real MoE layer and dispatchers, routing forced: an expert with no tokens, a
micro-batch with no row to compute (every slot to a null expert), and under EP a rank that receives no
token (flat, and hierarchical over 2 "nodes" x 2 ranks). Each matches the reference computation, keeps
every gradient finite (empty experts' exactly zero), and never hands the grouped GEMM an empty input (some
CUDA kernels mishandle one)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

from moetrain.config.model import MoEConfig
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers.base import RoutingDecision
from moetrain.parallel.layout import ParallelLayout
from moetrain.parallel.parallelize import parallelize

E, D, F, T = 4, 16, 32, 12


def _layer(null_experts: int = 0, dispatch: str = "flat") -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, expert_type="swiglu", expert_hidden=F, null_experts=null_experts,
                    router={"kind": "topk", "top_k": 2, "renormalize": True}, dispatch=dispatch)  # fmt: skip
    return MoELayer(cfg, d_model=D, d_hidden=F, vocab_size=64)


def _force(layer: MoELayer, ids_TK: torch.Tensor) -> None:
    """The router's decision, replaced by fixed expert ids and gates (a seeded draw)."""

    def route(x_TD, token_ids_T, group_size=None):
        gates_TK = torch.rand(ids_TK.shape, generator=torch.Generator().manual_seed(3))
        return RoutingDecision(ids_TK, gates_TK, torch.zeros((), device=x_TD.device))

    layer.router.forward = route


def _spy_rows(layer: MoELayer) -> list[int]:
    """Records the rows every call of the layer's experts gets."""
    seen: list[int] = []
    real = GroupedExperts.forward

    def forward(x_ND, counts_L, padded=False, recompute_x=None):
        seen.append(x_ND.shape[0])
        return real(layer.experts, x_ND, counts_L, padded, recompute_x)

    layer.experts.forward = forward
    return seen


def _reference(layer: MoELayer, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k gate * SwiGLU_{e}(x_t) over the real experts, by plain loops."""
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e >= layer.num_experts:
                continue
            h = torch.nn.functional.silu(x_TD[t] @ ex.w1_SLDF[0, e]) * (x_TD[t] @ ex.w3_SLDF[0, e])
            out[t] += gates_TK[t, k] * (h @ ex.w2_SLFD[0, e])
    return out


def _step(layer, x_TD, ids_TK):
    x = x_TD.clone().requires_grad_(True)
    y = layer(x, torch.zeros(x.shape[0], dtype=torch.long)).y_TD
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad


def test_experts_without_tokens_get_zero_gradients():
    layer = _layer()
    ids_TK = torch.zeros(T, 2, dtype=torch.long)
    ids_TK[:, 1] = 2  # experts 1 and 3 get nothing
    _force(layer, ids_TK)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    y, gx = _step(layer, x_TD, ids_TK)
    gates = torch.rand(ids_TK.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(y, _reference(layer, x_TD, ids_TK, gates), atol=1e-5, rtol=1e-5)
    for p in layer.experts.parameters():
        assert torch.isfinite(p.grad).all()
        assert torch.equal(p.grad[:, 1], torch.zeros_like(p.grad[:, 1])) and (p.grad[:, 0] != 0).any()
    assert torch.isfinite(gx).all()


def test_a_micro_batch_with_no_row_to_compute():
    """Every slot to the null expert: nothing for any expert, the output is zero, nothing is NaN, and the
    grouped GEMM still gets a row (the zero row the padding rule hands expert 0)."""
    layer = _layer(null_experts=1)
    _force(layer, torch.full((T, 2), E))  # id E: the null expert
    seen = _spy_rows(layer)
    y, gx = _step(layer, torch.randn(T, D), None)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(gx, torch.zeros_like(gx))
    assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in layer.experts.parameters())
    assert seen and min(seen) >= 1


def _hierarchical_topology(rank: int):
    """4 ranks as 2 nodes x 2 (EP rank = node * 2 + local index): the two-phase exchange's groups."""
    from moetrain.parallel.hierarchical import Topology

    new = torch.distributed.new_group  # NOTE: every rank creates every group, in the same order
    node_groups, cross_groups = [new([0, 1]), new([2, 3])], [new([0, 2]), new([1, 3])]
    return Topology(2, 2, node_groups[rank // 2], cross_groups[rank % 2])


def _ep_case(rank: int, world: int, case: str, dispatch: str = "flat") -> None:
    layout = ParallelLayout(rank, world, rank, ep_size=world, ep_group=torch.distributed.group.WORLD)
    if dispatch == "hierarchical":
        layout.node_of = (0, 0, 1, 1)
        layout.topology = _hierarchical_topology(rank)
    null = 1 if case == "nothing_at_all" else 0
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    x_TD = torch.randn(T, D, generator=g)
    if case == "nothing_at_all":
        ids_TK = torch.full((T, 2), E)
    else:  # every slot to experts 0 and 1, held by rank 0 (world 2) or ranks 0 and 1 (world 4): the rest get nothing
        ids_TK = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], dim=1)
    whole = _layer(null)
    _force(whole, ids_TK)
    y_ref, gx_ref = _step(whole, x_TD, ids_TK)
    ep = parallelize(_layer(null, dispatch), layout)
    assert type(ep.dispatcher).__name__ == (
        "HierarchicalDispatcher" if dispatch == "hierarchical" else "AllToAllDispatcher"
    )
    _force(ep, ids_TK)
    seen = _spy_rows(ep)
    y, gx = _step(ep, x_TD, ids_TK)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert seen and min(seen) >= 1  # the receiving-nothing rank gave its experts a zero row, not an empty input
    for p_ep, (name, p) in zip(ep.experts.parameters(), whole.experts.named_parameters()):
        full = p.grad.clone()
        torch.distributed.all_reduce(full)  # the whole model's expert gradients, summed over the ranks' tokens
        L = E // world
        torch.testing.assert_close(p_ep.grad, full[:, rank * L : (rank + 1) * L], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.multiproc
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["rank_receives_nothing", "nothing_at_all"])
def test_empty_work_under_expert_parallelism(case):
    run_distributed(_ep_case, 2, case)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["rank_receives_nothing", "nothing_at_all"])
def test_empty_work_under_the_hierarchical_exchange(case):
    """EP 4 over 2 "nodes" x 2: ranks 2 and 3 (one whole node) receive no row, yet take part in both
    phases, forward and backward, and pad one zero row as on the flat path."""
    run_distributed(_ep_case, 4, case, "hierarchical")
