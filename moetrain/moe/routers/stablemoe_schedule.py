"""StableMoE's stage schedule: the between-steps hooks :class:`StableMoERouter` declares.

:class:`StableRoutingSchedule` switches every StableMoE router from stage 1 (learn the routing) to
stage 2 (frozen distilled routing) at a gradient-accumulation boundary: after ``stage1_steps``
optimizer steps (``switch: steps``), or once the distilled router agrees with the backbone and balances
the load well enough over a window of steps (``switch: adaptive``, at ``stage1_steps`` at the latest).
It logs the switch step, the reason and the window's statistics, and keeps them in the router's
buffers, so they are in the checkpoint.

How the frozen distilled router is kept bit-identical inside DeepSpeed (``docs/stablemoe.md``):

1. :meth:`StableMoERouter.set_stage` sets ``requires_grad_(False)`` and ``.grad = None`` on D and Ê:
   no gradient is computed, DeepSpeed's ZeRO-0 all-reduce skips them, and torch's AdamW skips a
   parameter whose ``.grad`` is None (no weight decay, no momentum step).
2. That is not enough under ZeRO-1/2 (and bf16), where the optimizer steps on flat fp32 partitions and
   a parameter without a gradient contributes zeros to them: Adam's momentum and the decoupled weight
   decay would still move it. So the router tags D and Ê for an optimizer group of their own
   (:data:`DISTILLED_GROUP`, ``StableMoERouter.optimizer_group_tags``), and the switch freezes that group
   (:meth:`~moetrain.moe.hooks.HookContext.freeze_group`: learning rate and weight decay 0, in the
   optimizer's groups and the LR schedule). AdamW's update is then ``p * (1 - 0) - 0 * m / denom``:
   bit-identical.
3. The stage is a buffer of the router, so it is in the checkpoint; the zeroed group learning rates are
   in the optimizer state of the checkpoint. On resume the router reloads its stage (and re-applies 1.)
   and this hook re-applies 2. before the first forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moetrain.config.routers import AdaptiveSwitchConfig, StableMoERouterConfig
from moetrain.moe.hooks import HookContext, StepReport, TrainingHooks
from moetrain.moe.metrics import max_over_mean
from moetrain.moe.routers.stablemoe_stage import DISTILLED_GROUP, WINDOW_SCALE, WINDOW_STATS, RouterStage, SwitchReason

if TYPE_CHECKING:
    from moetrain.moe.routers.stablemoe import StableMoERouter


class StableRoutingSchedule(TrainingHooks):
    """Switch every StableMoE router to stage 2; see the module docstring.

    ``switch: steps``: before optimizer step ``stage1_steps`` (0-based), i.e. after ``stage1_steps``
    updates of stage 1 (the code's ``num_updates >= two_stage_updates``). ``switch: adaptive``: after
    the first update whose window meets :class:`AdaptiveSwitchConfig` (checked in ``after_step``,
    so the checkpoint of that step is already in stage 2), else as ``steps``.

    Every stage-1 step writes one row of statistics per layer into the router's ring buffer
    (all-reduced over the ranks, so every rank holds the same ring and decides the same).
    NOTE: ``switch: adaptive`` reads the ring every step of stage 1 (one host sync per step).
    """

    def __init__(self, routers: list[StableMoERouter], cfg: StableMoERouterConfig) -> None:
        self.routers = routers
        self.cfg = cfg
        self.frozen = False

    def on_train_start(self, ctx: HookContext) -> None:
        self.stage1_steps = self.cfg.resolved_stage1_steps(ctx.total_steps)
        group = self.routers[0].stats_group
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        if any(r.stage is RouterStage.FROZEN for r in self.routers):  # restored from the checkpoint
            self.freeze(ctx)
        elif ctx.step >= self.stage1_steps:
            self.switch(ctx, ctx.step, self._timeout_reason())

    def before_step(self, ctx: HookContext, step: int) -> None:
        if not self.frozen and step >= self.stage1_steps:
            self.switch(ctx, step, self._timeout_reason())

    def after_step(self, ctx: HookContext, report: StepReport) -> None:
        if self.frozen:
            return
        record_step(self.routers, report, self.group)
        if self.cfg.switch == "adaptive" and criteria_met(window_stats(self.routers), self.cfg.adaptive):
            self.switch(ctx, report.step, SwitchReason.CRITERIA)

    def _timeout_reason(self) -> SwitchReason:
        return SwitchReason.MAX_STEPS if self.cfg.switch == "adaptive" else SwitchReason.STEPS

    def switch(self, ctx: HookContext, step: int, reason: SwitchReason) -> None:
        """Record the switch (step, reason, the window's statistics), freeze, and log it."""
        stats = window_stats(self.routers)
        for router in self.routers:
            router.switch_buf.copy_(torch.tensor([step, int(reason)]))
        self.freeze(ctx)
        metrics: dict[str, float] = {
            "moe/router_stage": int(RouterStage.FROZEN),
            "moe/switch_step": step,
            "moe/switch_reason": int(reason),
        }
        for i, st in enumerate(stats):
            metrics.update({f"moe/layer{i}/switch_{k}": v for k, v in st.items()})
        ctx.log(step, metrics)
        summary = "; ".join(
            f"layer {i}: agreement {st['distill_acc']:.3f}, distillation loss {st['distill']:.3f}, distilled "
            f"router's max/mean load {st['distilled_load_max_over_mean']:.2f} over {st['window_steps']} steps"
            for i, st in enumerate(stats)
        )
        ctx.say(
            f"step {step}: StableMoE stage 2 ({reason.name.lower()}) -- distilled router frozen, routing fixed; "
            + (summary or "no stage-1 statistics")
        )

    def freeze(self, ctx: HookContext) -> None:
        for router in self.routers:
            router.set_stage(RouterStage.FROZEN)
        if ctx.freeze_group(DISTILLED_GROUP) == 0:
            raise RuntimeError(
                f"no '{DISTILLED_GROUP}' optimizer group: the optimizer's groups must honour the parameters' "
                "optimizer_group_tags so that the frozen router leaves the updates"
            )
        self.frozen = True


# --- the switch statistics: a ring of per-step rows in each router's ``switch_window_buf`` ----------


@torch.no_grad()
def record_step(routers: list[StableMoERouter], report: StepReport, group: dist.ProcessGroup | None) -> None:
    """Write step ``report.step``'s row into every router's ring: agreement and distillation loss
    (means over micro-batches and ranks), expert loads of the backbone and the distilled router
    (sums). A skipped update writes an invalid row."""
    if not routers:
        return
    E = routers[0].num_experts
    micro = [stats for stats in report.moe_stats if stats]
    device = routers[0].switch_window_buf.device
    if report.skipped or not micro:
        rows = torch.zeros(len(routers), WINDOW_STATS + 2 * E, dtype=torch.float64, device=device)
    else:
        rows = torch.stack(
            [
                torch.cat(
                    [
                        torch.ones(1, dtype=torch.float64, device=device),
                        sum(m[i].aux_terms["distill_acc"].double() for m in micro).reshape(1) / len(micro),
                        sum(m[i].aux_terms["distill"].double() for m in micro).reshape(1) / len(micro),
                        sum(m[i].load_E.double() for m in micro),
                        sum(m[i].aux_terms["distilled_load"].double() for m in micro),
                    ]
                )
                for i in range(len(routers))
            ]
        ).to(device)
    if group is not None:
        dist.all_reduce(rows, group=group)
        rows[:, :WINDOW_STATS] /= dist.get_world_size(group)
    rows[:, 1:3] *= WINDOW_SCALE
    slot = report.step % routers[0].switch_window_buf.shape[0]
    for router, row in zip(routers, rows.round().long()):
        router.switch_window_buf[slot] = row


def window_stats(routers: list[StableMoERouter]) -> list[dict[str, float]]:
    """Per layer: the ring's valid steps, their mean agreement and distillation loss, and the max/mean
    expert load of the backbone and of the distilled router (loads summed over the window)."""
    out = []
    for router in routers:
        ring = router.switch_window_buf.double().cpu()
        E = router.num_experts
        valid = ring[:, 0] > 0
        n = int(valid.sum())
        ring = ring[valid]
        out.append(
            {
                "window_steps": n,
                "distill_acc": float(ring[:, 1].sum() / WINDOW_SCALE / max(n, 1)),
                "distill": float(ring[:, 2].sum() / WINDOW_SCALE / max(n, 1)),
                "load_max_over_mean": max_over_mean(ring[:, WINDOW_STATS : WINDOW_STATS + E].sum(0)) if n else 0.0,
                "distilled_load_max_over_mean": max_over_mean(ring[:, WINDOW_STATS + E :].sum(0)) if n else 0.0,
            }
        )
    return out


def criteria_met(stats: list[dict[str, float]], cfg: AdaptiveSwitchConfig) -> bool:
    """Every layer: a full window, agreement >= min_agreement, distilled max/mean load <= max_load."""
    return bool(stats) and all(
        st["window_steps"] >= cfg.window
        and st["distill_acc"] >= cfg.min_agreement
        and st["distilled_load_max_over_mean"] <= cfg.max_load
        for st in stats
    )
