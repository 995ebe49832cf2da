"""BASE layer router (Lewis et al. 2021), as the StableMoE paper ran it: balanced assignment in
training, greedy at evaluation, sigmoid gate, no auxiliary loss.

Legend: T tokens, D model dim, E experts.

- scores ``s_TE = x E^T`` (fp32, no bias, E orthogonal with gain 0.1, as upstream BASE);
- training: every expert takes exactly T/E of this rank's tokens (T = micro-batch tokens of the
  rank, as in the code, where each worker balances its own tokens), maximising the total affinity
  (:mod:`moetrain.moe.routers.balanced`; when E does not divide T the first T mod E experts take
  one token more);
- evaluation: greedy argmax (no balancing), as the code;
- gate ``sigmoid(s[a])`` with gradient (the only signal that trains E); no aux loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from moetrain.kernels import KernelBackend
from moetrain.moe.routers.balanced import balanced_assignment
from moetrain.moe.routers.init import orthogonal_, private_generator
from moetrain.moe.routing import Router, RoutingDecision, zero_loss
from moetrain.schema import StrictModel


class BaseRouterConfig(StrictModel):
    kind: Literal["base"] = "base"
    assignment: Literal["exact", "auction"] = Field(
        "exact",
        description="exact: the optimal balanced assignment; auction: fairseq's epsilon-optimal auction (the papers)",
    )
    auction_epsilon: float = Field(
        0.02, gt=0.0, description="auction: eps as a fraction of the score range (code: 1/50)"
    )
    init_gain: float = Field(0.1, gt=0.0, description="gain of the orthogonal init of the centroids")


class BaseRouter(Router):
    def __init__(self, cfg: BaseRouterConfig, d_model: int, num_experts: int, backend: KernelBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = 1
        self.backend = backend
        self.centroids_ED = nn.Parameter(torch.empty(num_experts, d_model))
        orthogonal_(self.centroids_ED, cfg.init_gain, private_generator())

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
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
