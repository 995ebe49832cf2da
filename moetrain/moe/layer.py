"""The MoE layer: router -> dispatcher -> grouped experts -> combine (shapes: moetrain/moe/__init__.py),
plus the shared experts (``moe.shared_experts``, optionally gated) and the Residual-MoE dense branch
(``moe.residual``) on every token.

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
from moetrain.moe.fluctuation import FluctuationProbe
from moetrain.moe.hooks import TrainingHooks
from moetrain.moe.metrics import LayerStats
from moetrain.moe.routers import build_router
from moetrain.moe.routers.expert_choice import ExpertChoiceRouter
from moetrain.moe.shared import SharedExperts


@dataclass(frozen=True)
class MoEOutput:
    y_TD: torch.Tensor  # the combined expert branch (the caller adds the residual)
    aux_loss: torch.Tensor
    stats: LayerStats


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, d_hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.null_experts = cfg.null_experts  # AdaMoE: router choices with no compute (ids E .. E+M-1)
        self.capacity_factor = cfg.capacity_factor
        self.fluctuation = cfg.fluctuation  # the routing-fluctuation probe this layer declares (declare_hooks)
        self.ep_overlap = cfg.ep_overlap  # used by parallelize() when the experts are sharded
        self.dispatch = cfg.dispatch  # flat | hierarchical all-to-all, likewise
        self.backend = select_backend(cfg.kernels)
        self.router = build_router(
            cfg.router,
            d_model=d_model,
            num_experts=cfg.num_experts + cfg.null_experts,
            vocab_size=vocab_size,
            backend=self.backend,
        )
        self.expert_choice = isinstance(self.router, ExpertChoiceRouter)  # unchosen slots carry the null id E
        self.skips_slots = cfg.null_experts > 0 or self.expert_choice
        self.dispatcher: Dispatcher = LocalDispatcher(
            cfg.num_experts, cfg.capacity_factor, self.backend, self.skips_slots
        )
        self.experts = GroupedExperts(
            cfg.expert_type, cfg.num_experts, d_model, d_hidden, cfg.sublayers, init=cfg.expert_init
        )
        self.residual_ffn = self.residual_coef = None
        if cfg.residual:  # Residual MoE: a dense FFN beside the experts, mixed by a learned softmax
            self.residual_ffn = SharedExperts(cfg.expert_type, d_model, d_hidden)
            self.residual_coef = nn.Linear(d_model, 2)
        self.shared = None
        if cfg.shared_experts:
            width = cfg.shared_experts * (cfg.shared_expert_hidden or d_hidden)
            self.shared = SharedExperts(cfg.expert_type, d_model, width, gated=cfg.shared_expert_gate)

    @classmethod
    def declare_hooks(cls, layers: list[MoELayer]) -> list[TrainingHooks]:
        """The routing-fluctuation probe over every MoE layer, when ``moe.fluctuation.interval`` is set."""
        cfg = layers[0].fluctuation
        return [FluctuationProbe(layers, cfg)] if cfg.interval else []

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> MoEOutput:
        """1. route; 2. dispatch to (local) experts; 3. grouped experts; 4. weighted combine; 5. + shared.

        ``group_size``: tokens per sequence (the model passes it), for routers that work per sequence."""
        decision = self.router(x_TD, token_ids_T, group_size)
        y_TD, meta = self.dispatcher.run(x_TD, decision, self.experts)
        if self.residual_ffn is not None:
            coef_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
            y_TD = y_TD * coef_T2[:, :1] + self.residual_ffn(x_TD) * coef_T2[:, 1:]
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        # null experts are router choices (their load is counted, the last M entries); expert choice's
        # placeholder id E is not
        stats = LayerStats.from_decision(decision, self.num_experts + self.null_experts, meta.dropped)
        if self.null_experts:  # mean real experts per token: k minus its null slots
            real = (decision.expert_ids_TK < self.num_experts).sum(dim=-1).float().mean()
            stats.aux_terms["active_experts"] = real.detach()
        return MoEOutput(y_TD, decision.aux_loss, stats)
