"""The trainer's side of :mod:`moetrain.moe.hooks`: one callback runs every hook the model declares.

The trainer knows no router by name: :func:`moetrain.moe.hooks.collect_hooks` asks the model's modules
what they need between optimizer steps, and :class:`MoEHooksCallback` calls those hooks at the loop's
points through a :class:`TrainerContext` (what the trainer offers them: the step, logging, freezing a
tagged optimizer group, the training tokens, held-out blocks and an evaluation forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from moetrain.moe.hooks import StepReport, TrainingHooks
from moetrain.training.batches import to_device
from moetrain.training.callbacks import Callback, StepResult
from moetrain.training.optim import freeze_groups

if TYPE_CHECKING:
    from moetrain.training.trainer import Trainer


class TrainerContext:
    """:class:`moetrain.moe.hooks.HookContext` over a :class:`~moetrain.training.trainer.Trainer`."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @property
    def step(self) -> int:
        return self.trainer.state.step

    @property
    def total_steps(self) -> int:
        return self.trainer.cfg.train.steps

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.run_dir)

    @property
    def is_writer(self) -> bool:
        return self.trainer.layout.rank == 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trainer.logger.log(step, metrics)

    def say(self, text: str) -> None:
        self.trainer.logger.write(text)

    def freeze_group(self, tag: str) -> int:
        engine = self.trainer.engine
        scheduler = engine.lr_scheduler
        optimizer = getattr(scheduler, "optimizer", None) or engine.optimizer
        return freeze_groups(optimizer, scheduler, tag)

    def training_tokens(self) -> list[np.ndarray]:
        return [blocks.tokens for blocks in self.trainer.stream.sources]

    def heldout_blocks(self, count: int) -> torch.Tensor:
        blocks = self.trainer.val_blocks
        return blocks.get([i % blocks.num_blocks for i in range(count)])[0]

    @torch.no_grad()
    def forward_eval(self, tokens_NS: torch.Tensor) -> None:
        engine = self.trainer.engine
        was_training = self.trainer.model.training
        engine.eval()
        try:
            for chunk in tokens_NS.split(self.trainer.cfg.train.micro_batch_size):
                engine(to_device(chunk, engine.device))
        finally:
            engine.train(was_training)


class MoEHooksCallback(Callback):
    """Runs the model's declared hooks (in their order) at the loop's points."""

    def __init__(self, hooks: list[TrainingHooks]) -> None:
        self.hooks = hooks
        self.ctx: TrainerContext | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.ctx = TrainerContext(trainer)
        for hook in self.hooks:
            hook.on_train_start(self.ctx)

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        for hook in self.hooks:
            hook.before_step(self.ctx, step)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        report = StepReport(result.step, result.moe_stats, result.skipped)
        for hook in self.hooks:
            hook.after_step(self.ctx, report)

    def on_train_end(self, trainer: Trainer) -> None:
        for hook in self.hooks:
            hook.on_train_end(self.ctx)
