"""Top-k router: Switch (k=1), GShard (k=2), any k; softmax or sigmoid scores in fp32.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.routers import TopKRouterConfig
from moetrain.kernels import KernelBackend
from moetrain.moe import aux
from moetrain.moe.routers.init import orthogonal_, private_generator
from moetrain.moe.routing import Router, RoutingDecision


class TopKRouter(Router):
    """logits = x W^T (fp32) -> scores -> top-k; Switch load-balance loss and z-loss attached."""

    def __init__(
        self,
        cfg: TopKRouterConfig,
        d_model: int,
        num_experts: int,
        backend: KernelBackend,
        stats_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if cfg.top_k > num_experts:
            raise ValueError(f"top_k ({cfg.top_k}) must be <= num_experts ({num_experts})")
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        self.backend = backend
        self.stats_group = stats_group
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        if cfg.init == "orthogonal":
            orthogonal_(self.weight_ED, cfg.init_gain, private_generator())  # one global draw, see routers/init.py
        else:
            nn.init.normal_(self.weight_ED, std=cfg.init_std)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        """1. fp32 logits; 2. fused gating (top-k, gates, counts); 3. aux losses on global counts."""
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        g = self.backend.topk_gating(logits_TE, self.top_k, self.cfg.score_func, self.cfg.renormalize)
        probs_TE = g.scores_TE
        if self.cfg.score_func == "sigmoid":  # the balance loss wants a distribution per token
            probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        terms: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=x_TD.device)
        if self.training and self.cfg.load_balance_coeff > 0:
            lb = aux.switch_load_balance_loss(probs_TE, g.counts_E, self.top_k, self.stats_group)
            loss = loss + self.cfg.load_balance_coeff * lb
            terms["load_balance"] = lb.detach()
        if self.training and self.cfg.z_loss_coeff > 0:
            zl = aux.z_loss(logits_TE)
            loss = loss + self.cfg.z_loss_coeff * zl
            terms["z_loss"] = zl.detach()
        return RoutingDecision(g.expert_ids_TK, g.gates_TK, loss, terms, probs_TE.detach())
