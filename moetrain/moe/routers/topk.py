"""Top-k router: Switch (k=1), GShard (k=2), any k; softmax or sigmoid scores in fp32.

Auxiliary-loss-free balancing (``bias_update_rate > 0``, DeepSeek-V3): a per-expert bias is added to
the scores to *choose* the k experts and never enters the gates. Each forward in training adds its
counts to ``pending_load_E`` (on the device: no host sync); after the optimizer step (the
:class:`BiasBalancing` hook the router declares) :meth:`TopKRouter.update_bias` all-reduces them over the data-parallel group (one all-reduce) and moves
the bias by ``+rate`` for experts below the mean load and ``-rate`` for those above it, the same on
every rank. The bias is kept as an integer count of net steps (``bias_steps_E``, int64, checkpointed)
times the rate: exact, and untouched when the model is cast to bf16 (a bf16 bias near 1 would round
an update of 0.001 away).

An imported bias (DeepSeek-V3's ``e_score_correction_bias``, ``correction_bias: true``) is an arbitrary
fp32 vector, which no count of steps represents. It is kept beside the steps as its fp32 bit pattern
in an int32 buffer (``bias_base_E``): integer buffers are never cast, so ``model.to(bfloat16)`` leaves
it bit for bit, and the bias is ``base + rate * steps`` in fp32 (exactly the imported vector while the
steps are 0; each update still moves it by +-rate). :meth:`TopKRouter.fold_bias_steps` moves the steps
into the base (export writes one fp32 vector), choosing the same experts.

DeepSeek-V3's other options: group-limited routing (``num_groups``, ``topk_groups``; in the gating
kernel's pre-pass) and ``gate_scale`` (its ``routed_scaling_factor``, applied to the gates after the
gating op, so both kernel backends share it).

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.routers import TopKRouterConfig
from moetrain.kernels import KernelBackend
from moetrain.moe import aux
from moetrain.moe.hooks import HookContext, StepReport, TrainingHooks
from moetrain.moe.routers.base import Router, RoutingDecision
from moetrain.moe.routers.init import orthogonal_, private_generator


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
        self.balances_by_bias = cfg.bias_update_rate > 0
        self.has_bias = self.balances_by_bias or cfg.correction_bias
        if self.balances_by_bias:
            self.register_buffer("bias_steps_E", torch.zeros(num_experts, dtype=torch.int64))
            self.register_buffer("pending_load_E", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        if cfg.correction_bias:  # the fp32 bits of the imported bias (0 bits = +0.0)
            self.register_buffer("bias_base_E", torch.zeros(num_experts, dtype=torch.int32))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> RoutingDecision:
        """1. fp32 logits; 2. fused gating (top-k, gates, counts); 3. aux losses on global counts (the
        sequence-wise one per group of ``group_size`` tokens: a sequence, when the model passes it)."""
        cfg = self.cfg
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        bias_E = self.bias_E if self.has_bias else None
        g = self.backend.topk_gating(
            logits_TE, self.top_k, cfg.score_func, cfg.renormalize, bias_E, cfg.num_groups, cfg.topk_groups
        )
        if self.balances_by_bias and self.training:
            self.pending_load_E += g.counts_E.detach()
        gates_TK = g.gates_TK if cfg.gate_scale == 1.0 else g.gates_TK * cfg.gate_scale
        probs_TE = g.scores_TE
        if self.cfg.score_func == "sigmoid":  # the balance loss wants a distribution per token
            probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        terms: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=x_TD.device)
        if self.training and self.cfg.load_balance_coeff > 0:
            lb = aux.switch_load_balance_loss(probs_TE, g.counts_E, self.top_k, self.stats_group)
            loss = loss + self.cfg.load_balance_coeff * lb
            terms["load_balance"] = lb.detach()
        if self.training and self.cfg.seq_aux_coeff > 0:
            sl = aux.sequence_balance_loss(probs_TE, g.expert_ids_TK, self.top_k, group_size or x_TD.shape[0])
            loss = loss + self.cfg.seq_aux_coeff * sl
            terms["seq_balance"] = sl.detach()
        if self.training and self.cfg.z_loss_coeff > 0:
            zl = aux.z_loss(logits_TE)
            loss = loss + self.cfg.z_loss_coeff * zl
            terms["z_loss"] = zl.detach()
        return RoutingDecision(g.expert_ids_TK, gates_TK, loss, terms, probs_TE.detach())

    @property
    def bias_E(self) -> torch.Tensor:  # noqa: N802 (the shape suffix convention)
        """The selection bias, fp32: ``base + bias_update_rate * bias_steps_E`` (each term when present)."""
        steps_E = self.cfg.bias_update_rate * self.bias_steps_E.float() if self.balances_by_bias else None
        if not self.cfg.correction_bias:
            return steps_E
        base_E = self.bias_base_E.view(torch.float32)
        return base_E if steps_E is None else base_E + steps_E

    @torch.no_grad()
    def fold_bias_steps(self) -> None:
        """Move the learned steps into the base: afterwards ``bias_E`` is the same fp32 vector (up to the
        sign of a zero, which no selection sees) with steps 0, so export can write it as one tensor."""
        if self.cfg.correction_bias and self.balances_by_bias:
            self.bias_base_E.copy_(self.bias_E.view(torch.int32))
            self.bias_steps_E.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """After an optimizer step: ``bias += rate * sign(mean load - load)`` over the global counts of
        the step's micro-batches, then start counting afresh."""
        load_E = self.pending_load_E
        if self.stats_group is not None and dist.get_world_size(self.stats_group) > 1:
            dist.all_reduce(load_E, group=self.stats_group)
        # sign(mean - load) with mean = sum / E, in integers: sign(sum - E * load)
        self.bias_steps_E += torch.sign(load_E.sum() - load_E * load_E.numel())
        load_E.zero_()

    @classmethod
    def declare_hooks(cls, routers: list[TopKRouter]) -> list[TrainingHooks]:
        balancing = [r for r in routers if r.balances_by_bias]
        return [BiasBalancing(balancing)] if balancing else []


class BiasBalancing(TrainingHooks):
    """Auxiliary-loss-free balancing: after each optimizer step, every biased router moves its bias."""

    def __init__(self, routers: list[TopKRouter]) -> None:
        self.routers = routers

    def after_step(self, ctx: HookContext, report: StepReport) -> None:
        for router in self.routers:
            router.update_bias()
