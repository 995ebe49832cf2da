"""Routing state that changes between optimizer steps, as trainer callbacks (never an ``if step``
inside ``forward``).

- :class:`StableRoutingSchedule`: StableMoE's switch from stage 1 (learn the routing) to stage 2
  (frozen distilled routing), at a gradient-accumulation boundary: after ``stage1_steps`` optimizer
  steps (``switch: steps``), or once the distilled router agrees with the backbone and balances the
  load well enough over a window of steps (``switch: adaptive``, at ``stage1_steps`` at the latest).
  It logs the switch step, the reason and the window's statistics, and keeps them in the router's
  buffers, so they are in the checkpoint.
- :class:`HashTableFromFrequencies`: builds the frequency-balanced Hash table from the training data
  at the start of a fresh run.
- :class:`~moetrain.training.fluctuation.FluctuationProbe`: the routing-fluctuation metric.

:func:`routing_callbacks` builds the ones a job config asks for; the trainer adds them to its list.

How the frozen distilled router is kept bit-identical inside DeepSpeed (``docs/stablemoe.md``):

1. :meth:`StableMoERouter.set_stage` sets ``requires_grad_(False)`` and ``.grad = None`` on D and Ê:
   no gradient is computed, DeepSpeed's ZeRO-0 all-reduce skips them, and torch's AdamW skips a
   parameter whose ``.grad`` is None (no weight decay, no momentum step).
2. That is not enough under ZeRO-1/2 (and bf16), where the optimizer steps on flat fp32 partitions and
   a parameter without a gradient contributes zeros to them: Adam's momentum and the decoupled weight
   decay would still move it. So D and Ê live in their own parameter groups
   (:func:`moetrain.training.optim.isolate_distilled_params`, at setup) whose learning rate and weight decay the switch sets
   to 0 -- in the optimizer's groups and in the LR scheduler's ``base_lrs`` so that the schedule does
   not restore them. AdamW's update is then ``p * (1 - 0) - 0 * m / denom``: bit-identical.
3. The stage is a buffer of the router, so it is in DeepSpeed's module checkpoint; the zeroed group
   learning rates are in the optimizer and scheduler checkpoints. On resume the router reloads its
   stage (and re-applies 1.) and this callback re-applies 2. before the first forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.job import JobConfig
from moetrain.config.routers import AdaptiveSwitchConfig, HashRouterConfig, StableMoERouterConfig
from moetrain.moe.metrics import max_over_mean
from moetrain.moe.routers.hash import HashRouter, balanced_table
from moetrain.moe.routers.stablemoe import WINDOW_SCALE, WINDOW_STATS, RouterStage, StableMoERouter, SwitchReason
from moetrain.training.callbacks import Callback, StepResult
from moetrain.training.fluctuation import FluctuationProbe
from moetrain.training.optim import DISTILLED_GROUP, freeze_distilled_groups

if TYPE_CHECKING:
    from moetrain.training.trainer import Trainer


def routing_callbacks(cfg: JobConfig) -> list[Callback]:
    """The routing callbacks ``cfg`` needs, in the order they must run."""
    moe = cfg.moe
    if moe is None:
        return []
    out: list[Callback] = []
    router = moe.router
    if isinstance(router, HashRouterConfig) and router.table == "balanced":
        out.append(HashTableFromFrequencies(router.balance_tokens))
    if isinstance(router, StableMoERouterConfig):
        out.append(StableRoutingSchedule(router, router.resolved_stage1_steps(cfg.train.steps)))
    if moe.fluctuation.interval:
        out.append(FluctuationProbe(moe.fluctuation, cfg.train.steps))
    return out


def stable_routers(model: nn.Module) -> list[StableMoERouter]:
    return [m for m in model.modules() if isinstance(m, StableMoERouter)]


class StableRoutingSchedule(Callback):
    """Switch every StableMoE router to stage 2; see the module docstring.

    ``switch: steps``: before optimizer step ``stage1_steps`` (0-based), i.e. after ``stage1_steps``
    updates of stage 1 (the code's ``num_updates >= two_stage_updates``). ``switch: adaptive``: after
    the first update whose window meets :class:`AdaptiveSwitchConfig` (checked in ``on_step_end``,
    so the checkpoint of that step is already in stage 2), else as ``steps``.

    Every stage-1 step writes one row of statistics per layer into the router's ring buffer
    (all-reduced over the ranks, so every rank holds the same ring and decides the same):
    NOTE: ``switch: adaptive`` reads the ring every step of stage 1 (one host sync per step).
    """

    def __init__(self, cfg: StableMoERouterConfig, stage1_steps: int) -> None:
        self.cfg = cfg
        self.stage1_steps = stage1_steps
        self.frozen = False

    def on_train_start(self, trainer: "Trainer") -> None:
        routers = stable_routers(trainer.model)
        self.group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        if any(r.stage is RouterStage.FROZEN for r in routers):  # restored from the checkpoint
            self.freeze(trainer)
        elif trainer.state.step >= self.stage1_steps:
            self.switch(trainer, trainer.state.step, self._timeout_reason())

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        if not self.frozen and step >= self.stage1_steps:
            self.switch(trainer, step, self._timeout_reason())

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if self.frozen:
            return
        routers = stable_routers(trainer.model)
        record_step(routers, result, self.group)
        if self.cfg.switch == "adaptive" and criteria_met(window_stats(routers), self.cfg.adaptive):
            self.switch(trainer, result.step, SwitchReason.CRITERIA)

    def _timeout_reason(self) -> SwitchReason:
        return SwitchReason.MAX_STEPS if self.cfg.switch == "adaptive" else SwitchReason.STEPS

    def switch(self, trainer: "Trainer", step: int, reason: SwitchReason) -> None:
        """Record the switch (step, reason, the window's statistics), freeze, and log it."""
        routers = stable_routers(trainer.model)
        stats = window_stats(routers)
        for router in routers:
            router.switch_buf.copy_(torch.tensor([step, int(reason)]))
        self.freeze(trainer)
        metrics: dict[str, float] = {
            "moe/router_stage": int(RouterStage.FROZEN),
            "moe/switch_step": step,
            "moe/switch_reason": int(reason),
        }
        for i, st in enumerate(stats):
            metrics.update({f"moe/layer{i}/switch_{k}": v for k, v in st.items()})
        trainer.logger.log(step, metrics)
        summary = "; ".join(
            f"layer {i}: agreement {st['distill_acc']:.3f}, distillation loss {st['distill']:.3f}, distilled "
            f"router's max/mean load {st['distilled_load_max_over_mean']:.2f} over {st['window_steps']} steps"
            for i, st in enumerate(stats)
        )
        trainer.logger.write(
            f"step {step}: StableMoE stage 2 ({reason.name.lower()}) -- distilled router frozen, routing fixed; "
            + (summary or "no stage-1 statistics")
        )

    def freeze(self, trainer: "Trainer") -> None:
        for router in stable_routers(trainer.model):
            router.set_stage(RouterStage.FROZEN)
        scheduler = trainer.engine.lr_scheduler
        optimizer = getattr(scheduler, "optimizer", None) or trainer.engine.optimizer
        if freeze_distilled_groups(optimizer, scheduler) == 0:
            raise RuntimeError(
                f"no '{DISTILLED_GROUP}' parameter group: build the optimizer's groups with "
                "moetrain.training.optim.isolate_distilled_params so the frozen router leaves the updates"
            )
        self.frozen = True


# --- the switch statistics: a ring of per-step rows in each router's ``switch_window_buf`` ----------


@torch.no_grad()
def record_step(routers: list[StableMoERouter], result: StepResult, group: dist.ProcessGroup | None) -> None:
    """Write step ``result.step``'s row into every router's ring: agreement and distillation loss
    (means over micro-batches and ranks), expert loads of the backbone and the distilled router
    (sums). A skipped update writes an invalid row."""
    if not routers:
        return
    E = routers[0].num_experts
    micro = [stats for stats in result.moe_stats if stats]
    device = routers[0].switch_window_buf.device
    if result.skipped or not micro:
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
    slot = result.step % routers[0].switch_window_buf.shape[0]
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


class HashTableFromFrequencies(Callback):
    """Frequency-balanced Hash table from the first ``max_tokens`` training tokens (fresh runs only:
    a resumed run has the table in its checkpoint). Every rank computes the same table. With a data
    mixture the tokens are taken from the sources in order, ``max_tokens`` in all."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.state.step > 0:
            return
        routers = [m for m in trainer.model.modules() if isinstance(m, HashRouter)]
        vocab = routers[0].table_V.numel()
        freq = np.zeros(vocab, dtype=np.int64)
        left = self.max_tokens
        for blocks in trainer.stream.sources:  # the training sources' PackedBlocks
            tokens = blocks.tokens
            end = min(len(tokens), left)
            for start in range(0, end, 1 << 24):
                chunk = np.asarray(tokens[start : min(end, start + (1 << 24))])
                freq += np.bincount(chunk, minlength=vocab)[:vocab]
            left -= end
        table = balanced_table(freq, routers[0].num_experts)
        for router in routers:
            router.set_table(table)
