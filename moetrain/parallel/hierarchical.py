"""Hierarchical all-to-all (``moe.dispatch: hierarchical``): gather within the node, exchange across nodes.

An expert-parallel group that spans n nodes with m of its ranks on each (EP rank p = node b * m +
local index t) exchanges the token rows in two phases (Tutel's 2D all-to-all, DeepSpeed's
hierarchical all-to-all):

1. within each node: rank (a, i) sends local rank t every row it has for ranks (*, t) of any node;
2. across nodes, among the ranks with the same local index: rank (a, i) sends node b's rank (b, i)
   the rows of its whole node for it.

The rows arrive in the order the flat all-to-all delivers them (by source rank, each source's rows
by expert), so everything after the exchange is unchanged; the return trip runs both phases in
reverse. Each row that must cross a node boundary crosses it once, as in the flat exchange: the
bytes across nodes are the same. What changes is their packaging: a rank sends n - 1 messages
across nodes instead of m * (n - 1), each m times larger on average, and phase 1 moves rows once
more within the node (NVLink). That pays where cross-node messages are small enough to be bound by
latency or per-message overhead (many ranks per node, fine-grained experts, short sequences), and
costs one extra intra-node pass where they are not. On one host (gloo, the tests) there is no fast
link to win on, so only the bytes per phase are meaningful there (``bench/ep_hierarchical.py``, which
counts them with a dispatch observer's ``messages`` hook: ``tests/traffic.py``).

Shapes: the legend in ``moetrain/moe/__init__.py``; C_PE counts per (source EP rank, global expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.parallel.all_to_all import AllToAllDispatcher, all_to_all


@dataclass(frozen=True)
class Topology:
    """This rank's EP group as n nodes x m ranks (EP rank p = b * m + t), and the two phase groups."""

    nodes: int  # n
    per_node: int  # m
    node_group: dist.ProcessGroup  # my node's m ranks of my EP group, by local index
    cross_group: dist.ProcessGroup  # the n ranks of my EP group with my local index, by node


@dataclass(frozen=True)
class ExchangePlan:
    """Index and split sizes of both phases for one layer's rows (every list in group-rank order)."""

    order1: torch.Tensor  # send-buffer rows in phase-1 order: by destination local index, then node
    splits1_send: list[int]
    splits1_recv: list[int]
    order2: torch.Tensor  # phase-1 output in phase-2 order: by destination node, then source local index
    splits2_send: list[int]
    splits2_recv: list[int]
    undo1: torch.Tensor  # inverse permutations, for the return trip
    undo2: torch.Tensor


def _block_order(sizes: list[int], order: list[int], device: torch.device) -> torch.Tensor:
    """Row indices that lay blocks of ``sizes`` (consecutive) out in block order ``order``."""
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    picked = sizes_t[order]
    new_starts = torch.cumsum(picked, 0) - picked
    total = int(picked.sum())
    shift = torch.repeat_interleave(starts[order] - new_starts, picked, output_size=total)
    return (torch.arange(total) + shift).to(device)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def plan_exchange(rows_PP: list[list[int]], me: int, nodes: int, per_node: int, device) -> ExchangePlan:
    """The two phases for EP rank ``me`` from the rows every rank sends every rank (``rows_PP[src][dst]``)."""
    n, m = nodes, per_node
    a, i = divmod(me, m)
    # phase 1: my send buffer [p = b*m + t] reordered to [t][b]; local rank t gets every (b, t) block
    order1_blocks = [b * m + t for t in range(m) for b in range(n)]
    order1 = _block_order(rows_PP[me], order1_blocks, device)
    send1 = [sum(rows_PP[me][b * m + t] for b in range(n)) for t in range(m)]
    recv1 = [sum(rows_PP[a * m + j][b * m + i] for b in range(n)) for j in range(m)]
    # phase 2: what arrived, blocks [j][b] of rows_PP[a*m+j][b*m+i], reordered to [b][j]
    sizes2 = [rows_PP[a * m + j][b * m + i] for j in range(m) for b in range(n)]
    order2 = _block_order(sizes2, [j * n + b for b in range(n) for j in range(m)], device)
    send2 = [sum(rows_PP[a * m + j][b * m + i] for j in range(m)) for b in range(n)]
    recv2 = [sum(rows_PP[b * m + j][me] for j in range(m)) for b in range(n)]
    return ExchangePlan(order1, send1, recv1, order2, send2, recv2, _inverse(order1), _inverse(order2))


def dispatch_rows(x_ND: torch.Tensor, plan: ExchangePlan, topo: Topology) -> torch.Tensor:
    """The rows each EP rank receives, in the flat all-to-all's order (differentiable)."""
    x = all_to_all(x_ND.index_select(0, plan.order1), plan.splits1_recv, plan.splits1_send, topo.node_group)
    return all_to_all(x.index_select(0, plan.order2), plan.splits2_recv, plan.splits2_send, topo.cross_group)


def return_rows(y_RD: torch.Tensor, plan: ExchangePlan, topo: Topology) -> torch.Tensor:
    """:func:`dispatch_rows` backwards: the rows back at their senders, in send-buffer order."""
    y = all_to_all(y_RD, plan.splits2_send, plan.splits2_recv, topo.cross_group).index_select(0, plan.undo2)
    return all_to_all(y, plan.splits1_send, plan.splits1_recv, topo.node_group).index_select(0, plan.undo1)


def observe_phases(dispatcher: "HierarchicalDispatcher", direction: str, plan: ExchangePlan, x: torch.Tensor):
    """Both phases' messages to the observer's ``messages`` hook (``direction``: dispatch or return), by EP rank."""
    m, me = dispatcher.topology.per_node, dispatcher.ep_rank
    a, i = divmod(me, m)
    node_peers = [a * m + t for t in range(m)]
    cross_peers = [b * m + i for b in range(dispatcher.topology.nodes)]
    ins, outs = (
        (plan.splits1_send, plan.splits2_send) if direction == "dispatch" else (plan.splits1_recv, plan.splits2_recv)
    )
    dispatcher._observe_messages(f"{direction}, within node", node_peers, ins, x)
    dispatcher._observe_messages(f"{direction}, across nodes", cross_peers, outs, x)


class HierarchicalDispatcher(AllToAllDispatcher):
    """:class:`AllToAllDispatcher` with the token exchanges in two phases; the counts are all-gathered
    over the EP group (every rank needs the whole table to plan both phases), one host sync per layer."""

    def __init__(self, *args, topology: Topology, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.overlap:
            raise ValueError("moe.dispatch hierarchical does not overlap its exchanges (moe.ep_overlap)")
        self.topology = topology

    def _exchange_counts(self, counts_E: torch.Tensor):
        gathered = counts_E.new_empty(self.ep_size * counts_E.numel())  # flat: gloo wants 1-D
        work = dist.all_gather_into_tensor(gathered, counts_E.contiguous(), group=self.group, async_op=True)
        return gathered.view(self.ep_size, counts_E.numel()), work

    def _count_tables(self, counts_E: torch.Tensor, received: torch.Tensor):
        P, L, me = self.ep_size, self.num_local_experts, self.ep_rank
        table = received.tolist()  # NOTE: the one host sync of this layer
        send_PL = [table[me][p * L : (p + 1) * L] for p in range(P)]
        recv_PL = [table[p][me * L : (me + 1) * L] for p in range(P)]
        rows_PP = [[sum(row[p * L : (p + 1) * L]) for p in range(P)] for row in table]
        topo = self.topology
        plan = plan_exchange(rows_PP, me, topo.nodes, topo.per_node, counts_E.device)
        return send_PL, recv_PL, received[:, me * L : (me + 1) * L], plan

    def _send_rows(self, x_ND, recv_splits, send_splits, plan):
        if self.observer is not None:
            observe_phases(self, "dispatch", plan, x_ND)
        return dispatch_rows(x_ND, plan, self.topology)

    def _return_rows(self, y_RD, send_splits, recv_splits, plan):
        if self.observer is not None:
            observe_phases(self, "return", plan, y_RD)
        return return_rows(y_RD, plan, self.topology)
