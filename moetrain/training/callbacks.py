"""Side concerns of training as callbacks: metrics, evaluation, checkpoints.

The loop in ``training/trainer.py`` calls ``on_train_start``, then per optimizer step ``on_step_start`` (before
the first forward: the place for routing-state changes) and ``on_step_end``, then ``on_train_end``; a rerun
of a finished run calls only ``on_nothing_to_do``. A checkpoint save reports its phases through
``on_checkpoint`` (``written``: this rank's files are on disk, not yet committed; ``committed``: rank 0
renamed the folder into place, before pruning older ones). Callers add their own callbacks through
``moetrain.cli.main(argv, callbacks=[...])`` (the tests' failpoints do, ``tests/faults.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moetrain.moe.metrics import LayerStats, MoEMetrics
from moetrain.parallel.collectives import mean_over_ranks
from moetrain.training import checkpoint

if TYPE_CHECKING:
    from moetrain.training.trainer import Trainer


@dataclass(frozen=True)
class StepResult:
    step: int  # the optimizer step just taken (1-based count of steps done)
    lm_loss: torch.Tensor  # mean over this rank's micro-batches, on device
    aux_loss: torch.Tensor
    moe_stats: list[list[LayerStats]]  # per micro-batch, per MoE layer
    tokens: int  # tokens in the global batch
    skipped: bool = False  # the update was dropped (train.nonfinite: skip); its losses are not finite


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_start(self, trainer: "Trainer", step: int) -> None: ...

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def on_checkpoint(self, trainer: "Trainer", step: int, phase: str) -> None: ...

    def on_nothing_to_do(self, trainer: "Trainer") -> None: ...


class MetricsCallback(Callback):
    """Train loss, lr, grad-norm, tokens/s and MoE health, averaged over ranks once per interval."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.moe = MoEMetrics(dist.group.WORLD if dist.is_initialized() else None)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = self.aux_sum = None
        self.steps = self.skipped = self.tokens = 0
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer: "Trainer") -> None:
        self._reset()

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        self.tokens += result.tokens
        if result.skipped:  # its losses are not finite: counted, not averaged
            self.skipped += 1
        else:
            self.loss_sum = result.lm_loss if self.loss_sum is None else self.loss_sum + result.lm_loss
            self.aux_sum = result.aux_loss if self.aux_sum is None else self.aux_sum + result.aux_loss
            for stats in result.moe_stats:
                if stats:
                    self.moe.add(stats)
            self.steps += 1
        trainer.logger.advance()
        if result.step % self.interval == 0 or result.step == trainer.last_step:
            self.flush(trainer, result.step)

    def flush(self, trainer: "Trainer", step: int) -> None:
        if not self.steps and not self.skipped:
            return
        if self.steps:
            sums = torch.stack([self.loss_sum.float(), self.aux_sum.float()])
        else:  # every step of the interval was skipped: the other ranks still reduce
            sums = torch.zeros(2, device=trainer.engine.device)
        means = mean_over_ranks(sums / max(self.steps, 1)).tolist()
        if not self.steps:  # every step of the interval was skipped
            means = [float("nan"), float("nan")]
        elapsed = time.perf_counter() - self.t0
        metrics = {
            "loss": means[0],
            "aux_loss": means[1],
            "lr": trainer.current_lr(),
            "grad_norm": trainer.grad_norm(),
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            "tokens": trainer.state.tokens,
        }
        if trainer.guard.skipped:
            metrics["skipped_steps"] = trainer.guard.skipped
        metrics.update(self.moe.flush())
        moe_layers = trainer.model.moe_layers()
        if moe_layers:  # MoE layers whose experts ran as a per-expert loop (no grouped GEMM here)
            metrics["moe/grouped_gemm_fallback_layers"] = sum(layer.experts.uses_loop for layer in moe_layers)
        trainer.logger.log(step, metrics)
        self._reset()


class EvalCallback(Callback):
    """Validation loss and perplexity at step 0 of a fresh run, every ``interval`` steps, and at the end
    (``interval`` 0: only at the end). Evaluation draws no random numbers, so it never changes training."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.last_eval = -1

    def on_train_start(self, trainer: "Trainer") -> None:
        if self.interval and trainer.state.step == 0:  # the starting point of a fresh run
            self.run(trainer, 0)

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if self.interval and result.step % self.interval == 0:
            self.run(trainer, result.step)

    def on_train_end(self, trainer: "Trainer") -> None:
        if trainer.state.step != self.last_eval:
            self.run(trainer, trainer.state.step)

    def run(self, trainer: "Trainer", step: int) -> None:
        self.last_eval = step
        losses = trainer.evaluate()
        trainer.logger.log(step, {**losses, "val_ppl": math.exp(min(losses["val_loss"], 50.0))})


class CheckpointCallback(Callback):
    def __init__(self, interval: int, at_end: bool) -> None:
        self.interval = interval
        self.at_end = at_end
        self.last_saved = -1

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if self.interval and result.step % self.interval == 0:
            self.save(trainer)

    def on_train_end(self, trainer: "Trainer") -> None:
        if self.at_end and trainer.state.step != self.last_saved:
            self.save(trainer)

    def save(self, trainer: "Trainer") -> None:
        step = trainer.state.step

        def on_phase(phase: str) -> None:
            for cb in trainer.callbacks:
                cb.on_checkpoint(trainer, step, phase)

        folder = checkpoint.save(
            trainer.engine,
            trainer.model,
            trainer.run_dir,
            step,
            trainer.layout,
            trainer.run_state(),
            trainer.cfg.checkpoint.keep_last,
            on_phase,
        )
        self.last_saved = step
        trainer.logger.write(f"saved checkpoint {folder}")
