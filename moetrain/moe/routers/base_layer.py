"""BASE layer router (Lewis et al. 2021), as the StableMoE paper ran it: balanced assignment in
training, greedy at evaluation, sigmoid gate, no auxiliary loss.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

- scores ``s_TE = x E^T`` (fp32, no bias, E orthogonal with gain 0.1, as upstream BASE);
- training: every expert takes exactly T/E of this rank's tokens (T = micro-batch tokens of the
  rank, as in the code, where each worker balances its own tokens), maximising the total affinity
  (:mod:`moetrain.moe.routers.balanced_assignment`; when E does not divide T the first T mod E experts take
  one token more);
- evaluation: greedy argmax (no balancing), as the code;
- gate ``sigmoid(s[a])`` with gradient (the only signal that trains E); no aux loss.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.config.routers import BaseLayerRouterConfig
from moetrain.kernels import KernelBackend
from moetrain.moe.routers.balanced_assignment import balanced_assignment
from moetrain.moe.routers.base import Router, RoutingDecision, zero_loss
from moetrain.moe.routers.init import orthogonal_, private_generator


class BaseLayerRouter(Router):
    def __init__(self, cfg: BaseLayerRouterConfig, d_model: int, num_experts: int, backend: KernelBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = 1
        self.backend = backend
        self.centroids_ED = nn.Parameter(torch.empty(num_experts, d_model))
        orthogonal_(self.centroids_ED, cfg.init_gain, private_generator())

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> RoutingDecision:
        """1. fp32 scores; 2. balanced assignment (training) or argmax (eval); 3. sigmoid gate."""
        scores_TE = x_TD.float() @ self.centroids_ED.float().t()
        if self.training:
            expert_ids_TK = balanced_assignment(scores_TE.detach(), self.cfg.assignment, self.cfg.auction_epsilon)[
                :, None
            ]
            gates_TK = torch.sigmoid(scores_TE.gather(1, expert_ids_TK))
        else:
            g = self.backend.topk_gating(scores_TE, 1, "sigmoid", False)
            expert_ids_TK, gates_TK = g.expert_ids_TK, g.gates_TK
        probs_TE = torch.softmax(scores_TE.detach(), dim=-1)
        return RoutingDecision(expert_ids_TK, gates_TK, zero_loss(x_TD), {}, probs_TE)
