"""The token exchange overlapped with the experts (``moe.ep_overlap``).

The rows a rank routes to its *own* experts never travel, so the experts can work on them while the
exchanges run. :meth:`AllToAllDispatcher.run` sorts those rows last in the send buffer and hands this
module three chunks of expert work: the own rows' first half (a), the rows received from the other
ranks (r), the own rows' second half (b). Every all-to-all is issued asynchronously beside a chunk
that does not need it:

    forward   [dispatch exchange     || a] [r] [return exchange      || b]
    backward  [return exchange, rev. || b] [r] [dispatch exchange, rev. || a]

Every rank issues the same four exchanges in the same order (empty chunks included), so no rank can
wait on a collective another rank skips.

Autograd cannot run this schedule by itself (its engine would run the remote chunk's backward before
the own chunk's), so one :class:`_OverlappedExperts` node owns it: its forward builds each chunk's
graph on detached leaves (the rows and the expert weights, via ``torch.func.functional_call``), and
its backward differentiates the three graphs in the order above and returns the sums. Hooks on the
real parameters therefore see one gradient per step, as without overlap.

NOTE: off in layers that ``train.activation_checkpointing`` recomputes (``moetrain/model.py``): the
backward's nested passes over the chunk graphs would each make a non-reentrant checkpoint recompute
its region again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ExchangePlan:
    """What the overlapped chunks need from the routing (all sizes known on the host)."""

    send_splits: list[int]  # rows sent to each rank (0 to this rank: its own rows stay)
    recv_splits: list[int]  # rows received from each rank (0 from this rank)
    regroup_R: torch.Tensor  # received row -> position in local-expert order
    counts_R_L: torch.Tensor  # received rows per local expert
    own_rows: tuple[int, int]  # own rows in the first and second half (a, b)
    counts_a_L: torch.Tensor  # own rows per local expert, first half
    counts_b_L: torch.Tensor  # own rows per local expert, second half
    group: dist.ProcessGroup


def split_own(counts: list[int]) -> tuple[list[int], list[int]]:
    """Per-expert counts of the first and second half of rows grouped by expert (first half: ceil)."""
    first_rows = (sum(counts) + 1) // 2
    a, b = [], []
    for c in counts:
        take = min(c, first_rows)
        first_rows -= take
        a.append(take)
        b.append(c - take)
    return a, b


def _exchange(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Start an all-to-all with uneven splits; returns (output buffer, work to wait for, the input,
    which the caller keeps alive until the exchange is done)."""
    out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
    x_ND = x_ND.contiguous()
    work = dist.all_to_all_single(out, x_ND, out_splits, in_splits, group=group, async_op=True)
    return out, work, x_ND


class _Chunk:
    """One chunk's expert graph, on detached leaves (or no graph when no gradient is needed)."""

    def __init__(self, experts: nn.Module, weights: dict[str, torch.Tensor], x_ND: torch.Tensor, counts_L, grad: bool):
        self.x_ND = x_ND.detach().requires_grad_(grad)
        if x_ND.shape[0] == 0:  # nothing to compute; no graph
            self.y_ND, self.x_ND = x_ND.new_empty(0, x_ND.shape[-1]), None
            return
        self.y_ND = torch.func.functional_call(experts, weights, (self.x_ND, counts_L))

    def backward(self, grad_y_ND: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        """The rows' gradient; adds the weights' gradients into ``leaves``' ``.grad`` (the first chunk's
        becomes it, later ones add in place: no per-chunk sum is allocated). Frees the graph."""
        if self.x_ND is None:
            return grad_y_ND.new_empty(0, grad_y_ND.shape[-1])
        x = self.x_ND
        torch.autograd.backward(self.y_ND, grad_y_ND, inputs=[x, *leaves])
        self.x_ND = self.y_ND = None
        return x.grad if x.grad is not None else torch.zeros_like(x)


def _run_chunks(x_ND: torch.Tensor, plan: ExchangePlan, experts: nn.Module, weights, grad: bool):
    """The forward schedule; returns (output rows in x_ND's order, the chunks)."""
    n_send = sum(plan.send_splits)
    x_send, x_a, x_b = x_ND.split([n_send, *plan.own_rows])
    x_recv, work, _keep = _exchange(x_send, plan.recv_splits, plan.send_splits, plan.group)
    a = _Chunk(experts, weights, x_a, plan.counts_a_L, grad)
    work.wait()
    r = _Chunk(experts, weights, x_recv.index_select(0, plan.regroup_R), plan.counts_R_L, grad)
    y_recv = torch.empty_like(r.y_ND).index_copy_(0, plan.regroup_R, r.y_ND.detach())
    y_back, work, _keep = _exchange(y_recv, plan.send_splits, plan.recv_splits, plan.group)
    b = _Chunk(experts, weights, x_b, plan.counts_b_L, grad)
    work.wait()
    return torch.cat([y_back, a.y_ND.detach(), b.y_ND.detach()]), (a, r, b)


class _OverlappedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, plan: ExchangePlan, experts: nn.Module, names: list[str], *params):
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
        with torch.enable_grad():
            y_ND, chunks = _run_chunks(x_ND, plan, experts, dict(zip(names, leaves)), grad=True)
        ctx.plan, ctx.chunks, ctx.leaves = plan, chunks, leaves
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        plan, (a, r, b), leaves = ctx.plan, ctx.chunks, ctx.leaves
        ctx.chunks = ctx.leaves = None
        trainable = [leaf for leaf in leaves if leaf.requires_grad]
        n_send = sum(plan.send_splits)
        g_back, g_a, g_b = grad_y_ND.split([n_send, *plan.own_rows])
        g_recv, work, _keep = _exchange(g_back, plan.recv_splits, plan.send_splits, plan.group)
        gx_b = b.backward(g_b, trainable)
        work.wait()
        gx_r = r.backward(g_recv.index_select(0, plan.regroup_R), trainable)
        gx_recv = torch.empty_like(gx_r).index_copy_(0, plan.regroup_R, gx_r)
        g_send, work, _keep = _exchange(gx_recv, plan.send_splits, plan.recv_splits, plan.group)
        gx_a = a.backward(g_a, trainable)
        work.wait()
        grad_w = [_take_grad(leaf) if leaf.requires_grad else None for leaf in leaves]
        return (torch.cat([g_send, gx_a, gx_b]), None, None, None, *grad_w)


def _take_grad(leaf: torch.Tensor) -> torch.Tensor:
    """The leaf's gradient, detached from it (so the parameter's accumulation may take it without a copy);
    zeros for an expert that got no rows anywhere, as in the sequential path."""
    grad, leaf.grad = leaf.grad, None
    return grad if grad is not None else torch.zeros_like(leaf)


def overlapped_experts(x_ND: torch.Tensor, plan: ExchangePlan, experts: nn.Module) -> torch.Tensor:
    """The experts' output for the rows of ``x_ND`` ([sent rows][own rows], in that order), computed as
    three chunks beside the four asynchronous exchanges (module docstring)."""
    named = list(experts.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]
    needs_grad = torch.is_grad_enabled() and (x_ND.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:  # evaluation: the same schedule, no graphs
        return _run_chunks(x_ND, plan, experts, dict(named), grad=False)[0]
    return _OverlappedExperts.apply(x_ND, plan, experts, names, *params)
