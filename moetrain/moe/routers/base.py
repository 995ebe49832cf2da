"""What a router returns, and the base every router implements (shapes: moetrain/moe/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class RoutingDecision:
    """One layer's routing for one micro-batch.

    ``aux_loss`` is the router's weighted auxiliary loss (a scalar with gradient); the model adds it to
    the task loss, so it reaches the optimizer through autograd. ``aux_terms`` holds its unweighted
    components, detached, for logging.
    """

    expert_ids_TK: torch.Tensor  # int64
    gates_TK: torch.Tensor  # fp32, with gradient where the method has one
    aux_loss: torch.Tensor  # fp32 scalar
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    scores_TE: torch.Tensor | None = None  # routing probabilities, for the entropy metric


class Router(nn.Module):
    """Base class: ``forward(x_TD, token_ids_T, group_size=None) -> RoutingDecision``.

    ``x_TD`` is the layer input (fp32 routing is the router's job); ``token_ids_T`` are the current
    token ids, used by id-based routers (Hash, StableMoE's distilled router); ``group_size`` is the
    number of tokens per sequence (None: one group), used by routers that work per sequence
    (expert choice, the top-k router's sequence-wise balance loss).
    """

    num_experts: int
    top_k: int
    # The group whose tokens routing statistics (balance-loss counts) are reduced over: every
    # data-parallel rank. None on one process; :func:`moetrain.parallel.parallelize` sets it.
    stats_group: dist.ProcessGroup | None = None

    def forward(
        self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None
    ) -> RoutingDecision:  # pragma: no cover
        raise NotImplementedError


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)
