"""The MoE layer: router -> dispatcher -> grouped experts -> combine (shapes: moetrain/moe/__init__.py).

It is built for one process: all experts, the local dispatcher. :func:`moetrain.parallel.parallelize`
shards the experts and swaps in the all-to-all dispatcher afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config.model import MoEConfig
from moetrain.kernels import select_backend
from moetrain.moe.dispatch import Dispatcher, LocalDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.metrics import LayerStats
from moetrain.moe.routers import build_router


@dataclass(frozen=True)
class MoEOutput:
    y_TD: torch.Tensor  # the combined expert branch (the caller adds the residual)
    aux_loss: torch.Tensor
    stats: LayerStats


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, d_hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.capacity_factor = cfg.capacity_factor
        self.backend = select_backend(cfg.kernels)
        self.router = build_router(
            cfg.router, d_model=d_model, num_experts=cfg.num_experts, vocab_size=vocab_size, backend=self.backend
        )
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts, cfg.capacity_factor, self.backend)
        self.experts = GroupedExperts(cfg.expert_type, cfg.num_experts, d_model, d_hidden, cfg.sublayers)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> MoEOutput:
        """1. route; 2. dispatch to (local) experts; 3. grouped experts; 4. weighted combine."""
        decision = self.router(x_TD, token_ids_T)
        x_ND, counts_L, meta = self.dispatcher.dispatch(x_TD, decision)
        y_ND = self.experts(x_ND, counts_L, padded=self.dispatcher.pads_rows)
        y_TD = self.dispatcher.combine(y_ND, meta)
        stats = LayerStats.from_decision(decision, self.num_experts, meta.dropped)
        return MoEOutput(y_TD, decision.aux_loss, stats)
