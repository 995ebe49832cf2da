"""The MoE layer: router -> dispatcher -> grouped experts -> combine.

Legend: T tokens, D model dim, E experts, L local experts, K top-k, N routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moetrain.kernels import select_backend
from moetrain.moe.dispatch import Dispatcher, LocalDispatcher
from moetrain.moe.experts import ExpertType, GroupedExperts
from moetrain.moe.fluctuation import FluctuationConfig
from moetrain.moe.metrics import LayerStats
from moetrain.moe.routers import RouterConfig, build_router
from moetrain.moe.routers.topk import TopKRouterConfig
from moetrain.parallel.layout import ParallelLayout
from moetrain.schema import StrictModel


class MoEConfig(StrictModel):
    placement: Literal["replace_ffn", "insert"] = Field(
        "replace_ffn",
        description="replace_ffn: the FFN of every `every`-th block is an MoE layer; "
        "insert: an extra MoE layer after each block in `insert_after` (the StableMoE paper)",
    )
    every: int = Field(1, ge=1, description="replace_ffn: MoE in blocks every, 2*every, ... (1-based)")
    insert_after: list[int] | None = Field(None, description="insert: 0-based block indices; default the middle block")
    num_experts: int = Field(8, ge=1)
    expert_type: ExpertType = "gelu"
    expert_hidden: int | None = Field(None, ge=1, description="expert FFN width; default model.d_ff")
    sublayers: int = Field(3, ge=1, description="stacked experts: residual FFN sublayers per expert")
    capacity_factor: float | None = Field(None, gt=0, description="null = dropless; else slots per expert = ceil(cf*T*K/E)")
    expert_parallel_size: int = Field(1, ge=1, description="ranks the experts are sharded over")
    kernels: Literal["auto", "triton", "torch"] = "auto"
    router: RouterConfig = TopKRouterConfig()
    fluctuation: FluctuationConfig = Field(FluctuationConfig(), description="routing-fluctuation probe (moe/fluctuation.py)")

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        ep = self.expert_parallel_size
        if self.num_experts % ep:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be divisible by moe.expert_parallel_size ({ep})"
            )
        top_k = getattr(self.router, "top_k", 1)
        if top_k > self.num_experts:
            raise ValueError(f"moe.router.top_k ({top_k}) must be <= moe.num_experts ({self.num_experts})")
        return self

    def check_against_model(self, n_layers: int) -> None:
        for i in self.insert_after or []:
            if not 0 <= i < n_layers:
                raise ValueError(
                    f"moe.insert_after ({self.insert_after}) holds {i}, outside the blocks 0..{n_layers - 1}"
                )
        if self.placement == "replace_ffn" and self.every > n_layers:
            raise ValueError(f"moe.every ({self.every}) must be <= model.n_layers ({n_layers})")

    def moe_blocks(self, n_layers: int) -> list[int]:
        """0-based block indices that hold (replace_ffn) or are followed by (insert) an MoE layer."""
        if self.placement == "replace_ffn":
            return [i for i in range(n_layers) if (i + 1) % self.every == 0]
        return sorted(self.insert_after) if self.insert_after is not None else [n_layers // 2 - 1]


@dataclass(frozen=True)
class MoEOutput:
    y_TD: torch.Tensor  # the combined expert branch (the caller adds the residual)
    aux_loss: torch.Tensor
    stats: LayerStats


class MoELayer(nn.Module):
    def __init__(
        self, cfg: MoEConfig, d_model: int, d_hidden: int, vocab_size: int, layout: ParallelLayout
    ) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        backend = select_backend(cfg.kernels)
        self.router = build_router(
            cfg.router,
            d_model=d_model,
            num_experts=cfg.num_experts,
            vocab_size=vocab_size,
            backend=backend,
            stats_group=layout.stats_group,
        )
        self.dispatcher: Dispatcher = build_dispatcher(cfg, layout, backend)
        num_local = self.dispatcher.num_local_experts
        self.experts = GroupedExperts(
            cfg.expert_type, cfg.num_experts, d_model, d_hidden, cfg.sublayers,
            first_expert=layout.ep_rank * num_local, num_local=num_local,
        )

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> MoEOutput:
        """1. route; 2. dispatch to (local) experts; 3. grouped experts; 4. weighted combine."""
        decision = self.router(x_TD, token_ids_T)
        x_ND, counts_L, meta = self.dispatcher.dispatch(x_TD, decision)
        y_ND = self.experts(x_ND, counts_L, padded=self.dispatcher.pads_rows)
        y_TD = self.dispatcher.combine(y_ND, meta)
        stats = LayerStats.from_decision(decision, self.num_experts, meta.dropped)
        return MoEOutput(y_TD, decision.aux_loss, stats)


def build_dispatcher(cfg: MoEConfig, layout: ParallelLayout, backend) -> Dispatcher:
    if layout.ep_size == 1:
        return LocalDispatcher(cfg.num_experts, cfg.capacity_factor, backend)
    from moetrain.parallel.all_to_all import AllToAllDispatcher

    return AllToAllDispatcher(cfg.num_experts, cfg.capacity_factor, backend, layout)
