"""Routing state that changes between optimizer steps, as trainer callbacks (never an ``if step``
inside ``forward``).

- :class:`StableRoutingSchedule`: StableMoE's switch from stage 1 (learn the routing) to stage 2
  (frozen distilled routing) at ``stage1_steps`` optimizer steps, at a gradient-accumulation boundary.
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
from torch import nn

from moetrain.config.job import JobConfig
from moetrain.config.routers import HashRouterConfig, StableMoERouterConfig
from moetrain.moe.routers.hash import HashRouter, balanced_table
from moetrain.moe.routers.stablemoe import RouterStage, StableMoERouter
from moetrain.training.callbacks import Callback
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
        out.append(StableRoutingSchedule(router.resolved_stage1_steps(cfg.train.steps)))
    if moe.fluctuation.interval:
        out.append(FluctuationProbe(moe.fluctuation, cfg.train.steps))
    return out


def stable_routers(model: nn.Module) -> list[StableMoERouter]:
    return [m for m in model.modules() if isinstance(m, StableMoERouter)]


class StableRoutingSchedule(Callback):
    """Switch every StableMoE router to stage 2 before optimizer step ``stage1_steps`` (0-based), i.e.
    after ``stage1_steps`` updates of stage 1 (the code's ``num_updates >= two_stage_updates``)."""

    def __init__(self, stage1_steps: int) -> None:
        self.stage1_steps = stage1_steps
        self.frozen = False

    def on_train_start(self, trainer: "Trainer") -> None:
        routers = stable_routers(trainer.model)
        restored = any(r.stage is RouterStage.FROZEN for r in routers)  # from the checkpoint
        if restored or trainer.state.step >= self.stage1_steps:
            self.freeze(trainer, trainer.state.step, announce=not restored)

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        if not self.frozen and step >= self.stage1_steps:
            self.freeze(trainer, step, announce=True)

    def freeze(self, trainer: "Trainer", step: int, announce: bool) -> None:
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
        if announce:
            trainer.logger.log(step, {"moe/router_stage": int(RouterStage.FROZEN)})
            trainer.logger.write(f"step {step}: StableMoE stage 2 -- distilled router frozen, routing fixed")


class HashTableFromFrequencies(Callback):
    """Frequency-balanced Hash table from the first ``max_tokens`` training tokens (fresh runs only:
    a resumed run has the table in its checkpoint). Every rank computes the same table."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.state.step > 0:
            return
        routers = [m for m in trainer.model.modules() if isinstance(m, HashRouter)]
        vocab = routers[0].table_V.numel()
        tokens = trainer.train_blocks.tokens
        freq = np.zeros(vocab, dtype=np.int64)
        end = min(len(tokens), self.max_tokens)
        for start in range(0, end, 1 << 24):
            freq += np.bincount(np.asarray(tokens[start : min(end, start + (1 << 24))]), minlength=vocab)[:vocab]
        table = balanced_table(freq, routers[0].num_experts)
        for router in routers:
            router.set_table(table)
