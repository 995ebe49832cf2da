"""Expert-choice routing (Zhou et al., 2022): each expert picks its tokens, not the other way round.

Per group of tokens (a sequence, when the model passes ``group_size``; else the whole micro-batch),
every expert takes the C tokens with the highest routing score, C = ceil(capacity_factor * G * k / E)
(at most G): every expert gets exactly C tokens, so the load is balanced by construction and no
auxiliary loss is needed. A token may be chosen by several experts (its outputs are combined by their
gates, the softmax scores) or by none (the MoE branch adds nothing; the residual carries it).

The decision has one slot per expert (K = E): a token's chosen experts first, by descending score, then
the null id E for the rest, which the dispatchers skip (``route_rows``). So slot 0 is the token's best
chosen expert (what the fluctuation probe compares), or E when no expert chose it.

It looks at the whole group, later tokens included: not causal. Training and evaluation route the same
way (whole sequences); generating token by token is refused.

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (G: tokens per group, C: per expert and group).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetrain.config.routers import ExpertChoiceRouterConfig
from moetrain.moe.routers.base import Router, RoutingDecision, zero_loss


def expert_choice_capacity(group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    return max(1, min(group, math.ceil(capacity_factor * group * top_k / num_experts)))


class ExpertChoiceRouter(Router):
    def __init__(self, cfg: ExpertChoiceRouterConfig, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = num_experts  # slots per token: one per expert, unchosen ones null
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight_ED, std=cfg.init_std)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> RoutingDecision:
        """1. fp32 softmax scores per token; 2. each expert's top-C tokens of each group; 3. the slots."""
        T, E = x_TD.shape[0], self.num_experts
        G = group_size or T
        if T % G:
            raise ValueError(f"expert choice: {T} tokens do not split into groups of {G}")
        C = expert_choice_capacity(G, E, self.cfg.top_k, self.cfg.capacity_factor)
        scores_TE = torch.softmax(x_TD.float() @ self.weight_ED.float().t(), dim=-1)
        by_expert_NEG = scores_TE.detach().view(T // G, G, E).transpose(1, 2)
        # a stable sort: equal scores go to the earlier token (deterministic on every device)
        picked_NEC = torch.sort(by_expert_NEG, dim=-1, descending=True, stable=True).indices[..., :C]
        chosen_NEG = torch.zeros_like(by_expert_NEG, dtype=torch.bool).scatter_(-1, picked_NEC, True)
        chosen_TE = chosen_NEG.transpose(1, 2).reshape(T, E)
        key_TE = torch.where(chosen_TE, scores_TE.detach(), -1.0)
        order_TE = torch.sort(key_TE, dim=-1, descending=True, stable=True).indices
        real_TE = chosen_TE.gather(1, order_TE)
        expert_ids_TK = torch.where(real_TE, order_TE, E)
        gates_TK = scores_TE.gather(1, order_TE) * real_TE
        per_token_T = chosen_TE.sum(dim=-1).float()
        terms = {"experts_per_token": per_token_T.mean(), "unrouted_frac": (per_token_T == 0).float().mean()}
        return RoutingDecision(expert_ids_TK, gates_TK, zero_loss(x_TD), terms, scores_TE.detach())
