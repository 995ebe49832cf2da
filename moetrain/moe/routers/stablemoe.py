"""StableMoE router (Dai et al., ACL 2022): learn a balanced routing, distil it, then freeze it.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``, and R the distilled routing dim (50).

Spec: ``docs/stablemoe.md``. Per token t with layer input h_t and token id X_t::

    s_TE  = h E^T                 backbone scores: fp32, no bias, no norm
    ŝ_TE  = D(X) Ê^T              distilled router: its own V x R embedding and E x R centroids

    stage LEARN (training):  a = argmax s (no grad); gate = sigmoid(s[a]) (grad to E and h)
                             + balance loss and distillation loss (below)
    stage FROZEN:            a = argmax ŝ (D, Ê frozen); gate = sigmoid(s[a]) (E keeps learning)
    evaluation:              the FROZEN rule; during stage 1 ``eval_routing`` picks the distilled
                             router (the official code) or the backbone argmax

The stage is an explicit enum held in a buffer (so DeepSpeed's module checkpoint stores it) and
changed only by :meth:`StableMoERouter.set_stage`, which the router's schedule hook calls between
optimizer steps (:meth:`StableMoERouter.declare_hooks`, ``moetrain/moe/routers/stablemoe_schedule.py``);
``forward`` only reads it. The same hook keeps the switch record in buffers of the router (so it is
checkpointed too): the switch step and reason, and a ring of per-step routing statistics over the last
``adaptive.window`` steps of stage 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.config.routers import StableMoERouterConfig
from moetrain.kernels import KernelBackend
from moetrain.moe import aux
from moetrain.moe.routers.base import Router, RoutingDecision
from moetrain.moe.routers.init import orthogonal_, private_generator
from moetrain.moe.routers.stablemoe_schedule import StableRoutingSchedule
from moetrain.moe.routers.stablemoe_stage import (  # noqa: F401 - RouterStage, SwitchReason: part of this API
    DISTILLED_GROUP,
    WINDOW_STATS,
    RouterStage,
    SwitchReason,
)


class StableMoERouter(Router):
    """Two-stage stable routing; see the module docstring. Top-1 by construction."""

    def __init__(
        self,
        cfg: StableMoERouterConfig,
        d_model: int,
        num_experts: int,
        vocab_size: int,
        backend: KernelBackend,
        stats_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = 1
        self.backend = backend
        self.stats_group = stats_group
        self.centroids_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.distill_embed_VR = nn.Parameter(torch.empty(vocab_size, cfg.distill_dim))  # D: N(0, 1), as the code
        self.distill_centroids_ER = nn.Parameter(torch.empty(num_experts, cfg.distill_dim))
        gen = private_generator()
        orthogonal_(self.centroids_ED, cfg.init_gain, gen)
        orthogonal_(self.distill_centroids_ER, cfg.init_gain, gen)
        with torch.no_grad():
            self.distill_embed_VR.copy_(torch.randn(self.distill_embed_VR.shape, generator=gen))
        self.register_buffer("stage_buf", torch.tensor(int(RouterStage.LEARN), dtype=torch.int64))
        self._stage = RouterStage.LEARN  # host mirror of stage_buf: forward never reads the device
        # The switch record, written only by the schedule hook between optimizer steps:
        # [switch step (-1: not yet), SwitchReason] and the ring of per-step stage-1 statistics.
        self.register_buffer("switch_buf", torch.tensor([-1, int(SwitchReason.NONE)], dtype=torch.int64))
        row = WINDOW_STATS + 2 * num_experts
        self.register_buffer("switch_window_buf", torch.zeros(cfg.adaptive.window, row, dtype=torch.int64))

    # --- stage ---------------------------------------------------------------------------------------

    @property
    def stage(self) -> RouterStage:
        return self._stage

    def distilled_parameters(self) -> list[nn.Parameter]:
        """D and Ê: trained only by the distillation loss in stage 1, frozen in stage 2."""
        return [self.distill_embed_VR, self.distill_centroids_ER]

    @torch.no_grad()
    def set_stage(self, stage: RouterStage) -> None:
        """Switch the stage (call between optimizer steps). FROZEN stops D and Ê producing gradients.

        NOTE: this alone does not keep an optimizer from moving D and Ê (weight decay, momentum, or
        ZeRO's flat partitions stepping on zero gradients); the schedule hook also freezes their optimizer
        group (``moetrain/moe/routers/stablemoe_schedule.py``).
        """
        self._stage = RouterStage(stage)
        self.stage_buf.fill_(int(stage))
        frozen = self._stage is RouterStage.FROZEN
        for p in self.distilled_parameters():
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    def optimizer_group_tags(self) -> dict[str, list[nn.Parameter]]:
        """D and Ê in an optimizer group of their own, which the switch freezes."""
        return {DISTILLED_GROUP: self.distilled_parameters()}

    @classmethod
    def declare_hooks(cls, routers: list[StableMoERouter]) -> list[StableRoutingSchedule]:
        """The stage schedule, over every StableMoE router of the model at once."""
        return [StableRoutingSchedule(routers, routers[0].cfg)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.set_stage(RouterStage(int(self.stage_buf.item())))  # a checkpoint restores the stage

    # --- routing -------------------------------------------------------------------------------------

    def distilled_logits(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        """ŝ = D(X) Ê^T in fp32: a function of the token id only (no context, no backbone gradient)."""
        return F.embedding(token_ids_T, self.distill_embed_VR).float() @ self.distill_centroids_ER.float().t()

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> RoutingDecision:
        """1. backbone scores; 2. assignment by the stage's rule; 3. sigmoid gate of the backbone score
        of the chosen expert; 4. in training: stage-1 losses (zero in stage 2) and logged terms."""
        scores_TE = x_TD.float() @ self.centroids_ED.float().t()
        use_distilled = self._stage is RouterStage.FROZEN or (
            not self.training and self.cfg.eval_routing == "distilled"
        )
        distilled_TE = None
        if use_distilled:
            with torch.no_grad():
                distilled_TE = self.distilled_logits(token_ids_T)
            expert_ids_TK = distilled_TE.argmax(dim=-1, keepdim=True)  # ties -> lower id
            gates_TK = torch.sigmoid(scores_TE.gather(1, expert_ids_TK))
            counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
            counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK.reshape(-1)))
            decide_TE = distilled_TE
        else:
            g = self.backend.topk_gating(scores_TE, 1, "sigmoid", False)
            expert_ids_TK, gates_TK, counts_E = g.expert_ids_TK, g.gates_TK, g.counts_E
            decide_TE = scores_TE
        loss = torch.zeros((), device=x_TD.device)
        terms: dict[str, torch.Tensor] = {}
        if self.training:
            loss, terms = self._training_losses(scores_TE, expert_ids_TK[:, 0], gates_TK[:, 0], counts_E, token_ids_T)
        probs_TE = torch.softmax(decide_TE.detach(), dim=-1)  # the distribution that decides, for the entropy metric
        return RoutingDecision(expert_ids_TK, gates_TK, loss, terms, probs_TE)

    def _training_losses(
        self,
        scores_TE: torch.Tensor,
        expert_ids_T: torch.Tensor,
        gates_T: torch.Tensor,
        counts_E: torch.Tensor,
        token_ids_T: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 1: ``balance_coeff * L_bal + distill_coeff * L_dis``; stage 2: 0 (terms logged as 0).

        Reduction (NOTE: what makes data parallelism exact). The paper's losses are sums over the
        global micro-batch (all T_g tokens of one forward pass on every data-parallel rank); the task
        loss is a per-token mean, so both are divided by T_g (docs/stablemoe.md, "The algorithm", balance loss). Rank r
        returns ``world / T_g * (sum over its own tokens)``: gradient averaging divides by ``world``,
        so the sum of the per-rank losses / world equals the single-process loss over the global
        micro-batch, for any split of tokens over ranks. |A_i| and T_g come from one all-reduce of
        the expert counts (:func:`aux.global_counts`, no gradient); the count factor
        ``(|A_i| - n̄) / n̄`` is therefore a constant.
        """
        zero = torch.zeros((), device=scores_TE.device)
        if self._stage is RouterStage.FROZEN:
            agree = (scores_TE.detach().argmax(dim=-1) == expert_ids_T).float().mean()
            return zero, {"load_balance": zero, "distill": zero, "distill_acc": agree}
        counts_E = aux.global_counts(counts_E, self.stats_group).float()  # |A_i| over the global micro-batch
        total = counts_E.sum()  # T_g (top-1: one slot per token)
        world = dist.get_world_size(self.stats_group) if self.stats_group is not None else 1
        mean = total / self.num_experts  # n̄
        coeff_E = (counts_E - mean) / mean  # constant: > 0 over-loaded (push its scores down), < 0 under-loaded
        # sum_i coeff_i * sum_{t in A_i} sigmoid(s_ti) == sum_t coeff_{a_t} * gate_t (the gate is sigmoid(s_t,a_t))
        balance = world / total * (coeff_E[expert_ids_T] * gates_T).sum()
        distilled_TE = self.distilled_logits(token_ids_T)  # its only gradient goes to D and Ê
        target_T = expert_ids_T.detach()  # the backbone argmax (computed without gradient)
        distill = world / total * F.cross_entropy(distilled_TE, target_T, reduction="sum")
        distilled_ids_T = distilled_TE.detach().argmax(dim=-1)
        agree = (distilled_ids_T == target_T).float().mean()
        # the load the distilled router would give these tokens: what stage 2 will see
        distilled_load_E = torch.zeros(self.num_experts, device=scores_TE.device)
        distilled_load_E.scatter_add_(0, distilled_ids_T, torch.ones_like(distilled_ids_T, dtype=torch.float32))
        loss = self.cfg.balance_coeff * balance + self.cfg.distill_coeff * distill
        terms = {"load_balance": balance.detach(), "distill": distill.detach(), "distill_acc": agree}
        return loss, {**terms, "distilled_load": distilled_load_E}
