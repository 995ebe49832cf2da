"""Dispatchers move routed tokens to the experts and their outputs back (shapes: moetrain/moe/__init__.py).

The interface is two calls around the expert computation::

    x_ND, counts_L, meta = dispatcher.dispatch(x_TD, decision)
    y_ND = experts(x_ND, counts_L)
    out_TD = dispatcher.combine(y_ND, meta)

The MoE layer calls ``dispatcher.run(x_TD, decision, experts)``, which is those three calls
(:func:`run_in_sequence`) unless the dispatcher interleaves its exchanges with the experts
(``moe.ep_overlap``, ``moetrain/parallel/overlap.py``).

``meta`` is a frozen dataclass owned by the dispatcher; nothing is kept on ``self`` between the two
calls. :class:`LocalDispatcher` (one process) is the reference the all-to-all dispatcher must equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from moetrain.kernels import KernelBackend

if TYPE_CHECKING:  # a type only: importing the routers package here would import every router
    from moetrain.moe.routers.base import RoutingDecision


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Slots per expert in capacity mode: ceil(factor * T*K / E); None means dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_slots / num_experts))


def route_rows(
    backend: KernelBackend, ids_TK: torch.Tensor, num_experts: int, capacity: int | None, null_experts: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backend.routing_map`` plus null experts (AdaMoE): slots routed to an id >= ``num_experts`` go
    nowhere (row -1, no count, no compute). They sort after every real expert (one virtual expert E),
    so the real rows stay packed at the front. Returns (rows_TK, counts_E, null slots as an int64 scalar)."""
    if not null_experts:
        rows_TK, counts_E = backend.routing_map(ids_TK, num_experts, capacity)
        return rows_TK, counts_E, torch.zeros((), dtype=torch.int64, device=ids_TK.device)
    null_TK = ids_TK >= num_experts
    rows_TK, counts_E = backend.routing_map(ids_TK.clamp(max=num_experts), num_experts + 1, capacity)
    return torch.where(null_TK, -1, rows_TK), counts_E[:num_experts], null_TK.sum()


class Dispatcher(Protocol):
    num_local_experts: int
    pads_rows: bool  # dispatch may return rows past counts.sum() that belong to no expert (any call)

    def padded(self, meta: object) -> bool:
        """Whether the rows of this dispatch (``meta``) include rows past ``counts.sum()``."""
        ...

    def dispatch(self, x_TD: torch.Tensor, decision: RoutingDecision) -> tuple[torch.Tensor, torch.Tensor, object]: ...

    def recompute(self, x_TD: torch.Tensor, meta: object) -> Callable[[], torch.Tensor] | None:
        """What returns dispatch's x_ND again from x_TD, if that is cheap; None: backward keeps x_ND."""
        ...

    def combine(self, y_ND: torch.Tensor, meta: object) -> torch.Tensor: ...

    def run(self, x_TD: torch.Tensor, decision: RoutingDecision, experts: Callable) -> tuple[torch.Tensor, object]:
        """dispatch -> experts -> combine; returns (out_TD, meta)."""
        ...


def run_in_sequence(
    dispatcher: Dispatcher, x_TD: torch.Tensor, decision: RoutingDecision, experts: Callable
) -> tuple[torch.Tensor, object]:
    """dispatch, the experts on the dispatched rows, combine: one after the other."""
    x_ND, counts_L, meta = dispatcher.dispatch(x_TD, decision)
    recompute_x = dispatcher.recompute(x_TD, meta)  # backward may gather x_ND again (experts.py)
    y_ND = experts(x_ND, counts_L, padded=dispatcher.padded(meta), recompute_x=recompute_x)
    return dispatcher.combine(y_ND, meta), meta


@dataclass(frozen=True)
class LocalMeta:
    rows_TK: torch.Tensor  # row of the permuted buffer for each (token, slot); -1 = dropped
    gates_TK: torch.Tensor
    counts_E: torch.Tensor  # kept slots per expert (global = local here)
    dropped: torch.Tensor  # number of (token, slot) pairs dropped by the capacity, int64 scalar


class LocalDispatcher:
    """All experts on this process: sort by expert, gather, grouped GEMM, weighted gather back."""

    def __init__(
        self, num_experts: int, capacity_factor: float | None, backend: KernelBackend, null_experts: bool = False
    ):
        self.num_experts = self.num_local_experts = num_experts
        self.capacity_factor = capacity_factor
        self.null_experts = null_experts
        # dropped and null slots leave unused rows at the end
        self.pads_rows = capacity_factor is not None or null_experts
        self.backend = backend

    def dispatch(self, x_TD: torch.Tensor, decision: RoutingDecision) -> tuple[torch.Tensor, torch.Tensor, LocalMeta]:
        """1. routing map (rows, kept counts); 2. permute tokens into expert-contiguous rows."""
        ids_TK = decision.expert_ids_TK
        capacity = expert_capacity(ids_TK.numel(), self.num_experts, self.capacity_factor)
        rows_TK, counts_E, null = route_rows(self.backend, ids_TK, self.num_experts, capacity, self.null_experts)
        x_ND = self.backend.permute(x_TD, rows_TK)
        dropped = (rows_TK < 0).sum() - null
        return x_ND, counts_E, LocalMeta(rows_TK, decision.gates_TK, counts_E, dropped)

    def padded(self, meta: LocalMeta) -> bool:
        return self.pads_rows

    def recompute(self, x_TD: torch.Tensor, meta: LocalMeta) -> Callable[[], torch.Tensor]:
        """The permute again, without autograd: backward gathers x_ND from x_TD instead of saving it
        (``recompute_x`` in ``moetrain/moe/experts.py``)."""
        x_TD = x_TD.detach()
        return lambda: self.backend.permute(x_TD, meta.rows_TK)

    def combine(self, y_ND: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        """Weighted sum of each token's k expert outputs, in token order (dropped slots add 0)."""
        return self.backend.unpermute(y_ND, meta.rows_TK, meta.gates_TK)

    def run(self, x_TD: torch.Tensor, decision: RoutingDecision, experts: Callable) -> tuple[torch.Tensor, LocalMeta]:
        return run_in_sequence(self, x_TD, decision, experts)
