"""Expert-parallel dispatch: tokens travel to the rank holding their expert by all-to-all.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``; here T local tokens, L = E/P local experts, P EP-group size,
N = T*K permuted rows, R rows received from the EP group.

Steps (dispatch):
  1. routing map over the E global experts -> rows grouped by global expert (= by destination rank)
  2. all-to-all of the per-expert counts, started asynchronously: counts_PL received = how many rows
     each source sends to each of my local experts
  3. permute tokens into expert order (the same kernel as the local path) while the counts travel;
     then wait. The one host sync per layer turns both count tables into split sizes.
  4. all-to-all of the tokens with uneven splits (differentiable)
  5. regroup the received rows from [source rank][local expert] to [local expert][source rank]
combine reverses 5 -> 4 and finishes with the weighted gather-sum of the local path.

With ``overlap`` (``moe.ep_overlap``) the layer's :meth:`AllToAllDispatcher.run` sorts this rank's own
rows last in step 1 and computes them beside the exchanges instead of 4.-5. and their reverse
(``moetrain/parallel/overlap.py``).

Measurement is not the dispatcher's business: ``dispatcher.observer`` (None by default) is a hook a
benchmark or test attaches (:class:`DispatchObserver`: a context manager around each named phase, the
token bytes each forward exchange sends to other ranks, and optionally every message of each exchange).
``bench/ep_phases.py`` times the phases with one; the C5 byte count of tests/test_all_to_all.py is
another; the bytes within / across nodes of ``bench/ep_hierarchical.py`` (``tests/traffic.py``) a third.

``moe.dispatch: hierarchical`` (``moetrain/parallel/hierarchical.py``) subclasses the dispatcher: the
count exchange, the count tables and the two token exchanges (:meth:`AllToAllDispatcher._send_rows`,
:meth:`AllToAllDispatcher._return_rows`) are its hooks; ``AllToAllMeta.plan`` carries its exchange plan.

NOTE: every rank calls both all-to-alls in forward and, through autograd, in backward, even when it
sends or receives zero rows: skipping one would hang the ranks that did call it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from moetrain.kernels import KernelBackend
from moetrain.moe.dispatch import expert_capacity, route_rows, run_in_sequence
from moetrain.moe.routers.base import RoutingDecision
from moetrain.parallel.overlap import ExchangePlan, overlapped_experts, split_own


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward is the reverse exchange.

    NOTE: ``torch.distributed._functional_collectives.all_to_all_single_autograd`` was tried and taken
    out while chasing a gloo abort at interpreter exit; the abort came back without it (see
    ``moetrain.cli.entry``), so it was not the cause. This plain function is the one with the longest
    record here.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(in_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


@dataclass(frozen=True)
class AllToAllMeta:
    rows_TK: torch.Tensor  # row of each (token, slot) in the send buffer; -1 = dropped
    gates_TK: torch.Tensor
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    regroup_R: torch.Tensor  # received row -> position in local-expert order
    num_rows: int  # N = T*K (send buffer rows, including unused ones)
    dropped: torch.Tensor
    pad_rows: int = 0  # 1 when this rank received no row: a zero row keeps the grouped GEMM off an empty input
    plan: object = None  # the hierarchical exchange's plan (moetrain/parallel/hierarchical.py); flat: None


class DispatchObserver(Protocol):
    """What a benchmark or test attaches as ``AllToAllDispatcher.observer``."""

    def phase(self, name: str, device: torch.device) -> AbstractContextManager:
        """Around each named phase of dispatch / combine (forward)."""

    def exchanged(self, nbytes: int) -> None:
        """Token bytes this rank sends to *other* ranks in one forward exchange (called once per
        dispatch, also when a recompute in backward dispatches again)."""

    # Optional (called only where the observer defines it):
    # def messages(self, phase: str, me: int, peers: list[int], rows: list[int], row_bytes: int) -> None:
    #     """Every message of one forward token exchange: EP rank ``me`` sends ``rows[j]`` rows of
    #     ``row_bytes`` to EP rank ``peers[j]`` (its own share included, and empty messages).
    #     ``phase``: "dispatch" or "return" for the flat exchange; the hierarchical one reports each of
    #     its two phases ("dispatch, within node", "dispatch, across nodes", likewise "return, ...")."""


_NO_PHASE = nullcontext()  # reusable: nothing built per phase on the hot path


def _unobserved(name: str, device: torch.device) -> nullcontext:
    return _NO_PHASE


class AllToAllDispatcher:
    """Experts sharded over the EP group; interchangeable with :class:`LocalDispatcher`."""

    def __init__(
        self,
        num_experts: int,
        capacity_factor: float | None,
        backend: KernelBackend,
        group: dist.ProcessGroup,
        null_experts: bool = False,
        overlap: bool = False,
    ) -> None:
        """``group``: the expert-parallel group; its rank i holds experts i*L .. (i+1)*L - 1.
        ``null_experts``: ids >= num_experts are null experts (``route_rows``): never sent.
        ``overlap`` (``moe.ep_overlap``): :meth:`run` overlaps the exchanges with the experts."""
        self.null_experts = null_experts
        self.num_experts = num_experts
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_local_experts = num_experts // self.ep_size
        self.capacity_factor = capacity_factor
        self.pads_rows = False  # only the rows actually sent arrive
        self.backend = backend
        self.group = group
        self.observer: DispatchObserver | None = None  # attached by benchmarks and tests, never by training
        self.overlap = overlap
        self._keys: torch.Tensor | None = None  # _own_last_keys, built on first use

    def _route(self, x_TD: torch.Tensor, decision: RoutingDecision, own_last: bool):
        """Steps 1.-3.: rows by destination, counts exchanged while the tokens are permuted, the host sync.

        ``own_last``: this rank's own experts sort after every other rank's (the overlapped path), so
        the send buffer is [rows for the other ranks, in rank order][own rows]."""
        phase, dev = self._phase(), x_TD.device
        ids_TK = decision.expert_ids_TK
        capacity = expert_capacity(ids_TK.numel(), self.num_experts, self.capacity_factor)
        with phase("routing map", dev):  # 1.
            if own_last:
                ids_TK = self._own_last_keys(dev)[ids_TK.clamp(max=self.num_experts)]
            rows_TK, counts_E, null = route_rows(self.backend, ids_TK, self.num_experts, capacity, self.null_experts)
            if own_last:  # back to expert order for the count exchange
                counts_E = counts_E[self._own_last_keys(dev)[: self.num_experts]]
        with phase("count exchange + host sync", dev):  # 2.
            received, pending = self._exchange_counts(counts_E)
        with phase("permute", dev):  # 3.
            x_ND = self.backend.permute(x_TD, rows_TK)
        with phase("count exchange + host sync", dev):
            pending.wait()
            send_PL, recv_PL, recv_counts_PL, plan = self._count_tables(counts_E, received)
        dropped = (rows_TK < 0).sum() - null
        return rows_TK, x_ND, send_PL, recv_PL, recv_counts_PL, dropped, plan

    def _exchange_counts(self, counts_E: torch.Tensor):
        """Start the count exchange: (the tensor it fills, its pending work)."""
        recv_counts_E = torch.empty_like(counts_E)
        return recv_counts_E, dist.all_to_all_single(
            recv_counts_E, counts_E.contiguous(), group=self.group, async_op=True
        )

    def _count_tables(self, counts_E: torch.Tensor, received: torch.Tensor):
        """(rows I send per rank and local expert, rows I receive likewise: both on the host; the received
        counts on the device; the exchange plan or None)."""
        P, L = self.ep_size, self.num_local_experts
        recv_counts_PL = received.view(P, L)
        # NOTE: the one host sync of this layer: split sizes must be Python ints for the collective.
        send_PL, recv_PL = torch.stack([counts_E.view(P, L), recv_counts_PL]).tolist()
        return send_PL, recv_PL, recv_counts_PL, None

    def _send_rows(self, x_ND: torch.Tensor, recv_splits: list[int], send_splits: list[int], plan) -> torch.Tensor:
        if self.observer is not None:
            self._observe_messages("dispatch", list(range(self.ep_size)), send_splits, x_ND)
        return all_to_all(x_ND, recv_splits, send_splits, self.group)

    def _return_rows(self, y_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], plan) -> torch.Tensor:
        if self.observer is not None:
            self._observe_messages("return", list(range(self.ep_size)), recv_splits, y_RD)
        return all_to_all(y_RD, send_splits, recv_splits, self.group)

    def _observe_messages(self, phase: str, peers: list[int], rows: list[int], x: torch.Tensor) -> None:
        """The observer's optional ``messages`` hook (:class:`DispatchObserver`); called with an observer only."""
        hook = getattr(self.observer, "messages", None)
        if hook is not None:
            hook(phase, self.ep_rank, peers, rows, x.shape[-1] * x.element_size())

    def _phase(self):
        return self.observer.phase if self.observer is not None else _unobserved

    def _own_last_keys(self, device: torch.device) -> torch.Tensor:
        """Sort key of each expert id (E + 1 entries; the null id E keeps E): the other ranks' experts
        in rank order, then this rank's."""
        if self._keys is None or self._keys.device != device:
            L, me = self.num_local_experts, self.ep_rank
            e = torch.arange(self.num_experts + 1)
            rank, local = e // L, e % L
            slot = torch.where(rank == me, self.ep_size - 1, rank - (rank > me).long())
            self._keys = torch.where(e < self.num_experts, slot * L + local, e).to(device)
        return self._keys

    def _regroup_index(self, recv_counts_PL: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Received rows come [source rank][local expert]; the index that orders them by local expert
        (a stable sort keeps each expert's rows in source order)."""
        P, L = recv_counts_PL.shape
        local_ids_R = (
            torch.arange(P * L, device=recv_counts_PL.device)
            .remainder(L)
            .repeat_interleave(recv_counts_PL.reshape(-1), output_size=num_rows)
        )
        return torch.sort(local_ids_R, stable=True).indices

    def dispatch(self, x_TD: torch.Tensor, decision: RoutingDecision):
        phase, dev = self._phase(), x_TD.device
        rows_TK, x_ND, send_PL, recv_PL, recv_counts_PL, dropped, plan = self._route(x_TD, decision, own_last=False)
        send_splits = [sum(r) for r in send_PL]
        recv_splits = [sum(r) for r in recv_PL]
        n_send = sum(send_splits)
        if self.observer is not None:
            self.observer.exchanged((n_send - send_splits[self.ep_rank]) * x_ND.shape[-1] * x_ND.element_size())
        with phase("token all-to-all", dev):  # 4.
            x_RD = self._send_rows(x_ND[:n_send], recv_splits, send_splits, plan)
        with phase("regroup", dev):  # 5.
            regroup_R = self._regroup_index(recv_counts_PL, sum(recv_splits))
            x_RD = x_RD.index_select(0, regroup_R)
        # NOTE: a rank that receives no row would hand the grouped GEMM an empty input, which some CUDA
        # kernels mishandle; one zero row (of no expert: the experts run with ``padded``) avoids it, and
        # keeps x_RD in the graph, so backward still runs this rank's side of the exchange.
        pad_rows = int(sum(recv_splits) == 0)
        if pad_rows:
            x_RD = torch.cat([x_RD, x_RD.new_zeros(1, x_RD.shape[-1])])
        counts_L = recv_counts_PL.sum(0)
        num_rows = decision.expert_ids_TK.numel()
        meta = AllToAllMeta(
            rows_TK, decision.gates_TK, send_splits, recv_splits, regroup_R, num_rows, dropped, pad_rows, plan
        )
        return x_RD, counts_L, meta

    def padded(self, meta: AllToAllMeta) -> bool:
        return meta.pad_rows > 0

    def recompute(self, x_TD: torch.Tensor, meta: AllToAllMeta) -> None:
        """None: the received rows came from other ranks; backward keeps them."""
        return None

    def combine(self, y_RD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        phase, dev = self._phase(), y_RD.device
        if meta.pad_rows:
            y_RD = y_RD[: y_RD.shape[0] - meta.pad_rows]
        with phase("regroup", dev):  # undo 5.
            y_back_RD = torch.empty_like(y_RD).index_copy(0, meta.regroup_R, y_RD)
        with phase("return all-to-all", dev):  # undo 4.
            y_sent_ND = self._return_rows(y_back_RD, meta.send_splits, meta.recv_splits, meta.plan)
        with phase("combine", dev):
            pad = meta.num_rows - y_sent_ND.shape[0]
            if pad:
                y_sent_ND = torch.cat([y_sent_ND, y_sent_ND.new_zeros(pad, y_sent_ND.shape[-1])])
            return self.backend.unpermute(y_sent_ND, meta.rows_TK, meta.gates_TK)

    def run(self, x_TD: torch.Tensor, decision: RoutingDecision, experts: nn.Module):
        """dispatch -> experts -> combine; with ``overlap``, the exchanges run beside the experts' work on
        this rank's own rows (``moetrain/parallel/overlap.py``). Returns (out_TD, meta)."""
        if not self.overlap:
            return run_in_sequence(self, x_TD, decision, experts)
        P, me, dev = self.ep_size, self.ep_rank, x_TD.device
        phase = self._phase()
        rows_TK, x_ND, send_PL, recv_PL, recv_counts_PL, dropped, _ = self._route(x_TD, decision, own_last=True)
        send_splits = [0 if p == me else sum(send_PL[p]) for p in range(P)]
        recv_splits = [0 if p == me else sum(recv_PL[p]) for p in range(P)]
        n_send, own = sum(send_splits), send_PL[me]
        if self.observer is not None:
            self.observer.exchanged(n_send * x_ND.shape[-1] * x_ND.element_size())
            self._observe_messages("dispatch", list(range(P)), send_splits, x_ND)
            self._observe_messages("return", list(range(P)), recv_splits, x_ND)
        own_a, own_b = split_own(own)
        received = recv_counts_PL.clone()
        received[me] = 0  # the own rows stay
        remote = [sum(c) - o for c, o in zip(zip(*recv_PL), own)]  # received rows per local expert
        counts = torch.tensor([own_a, own_b, remote], device=dev)
        plan = ExchangePlan(
            send_splits=send_splits,
            recv_splits=recv_splits,
            regroup_R=self._regroup_index(received, sum(recv_splits)),
            counts_R_L=counts[2],
            own_rows=(sum(own_a), sum(own_b)),
            counts_a_L=counts[0],
            counts_b_L=counts[1],
            group=self.group,
        )
        with phase("experts + exchanges, overlapped", dev):
            y_ND = overlapped_experts(x_ND[: n_send + sum(own)], plan, experts)
        num_rows = decision.expert_ids_TK.numel()
        with phase("combine", dev):
            if num_rows > y_ND.shape[0]:
                y_ND = torch.cat([y_ND, y_ND.new_zeros(num_rows - y_ND.shape[0], y_ND.shape[-1])])
            y_TD = self.backend.unpermute(y_ND, rows_TK, decision.gates_TK)
        meta = AllToAllMeta(rows_TK, decision.gates_TK, send_splits, recv_splits, plan.regroup_R, num_rows, dropped)
        return y_TD, meta
