"""Auxiliary-loss-free load balancing: after each optimizer step, every top-k router with
``bias_update_rate > 0`` moves its selection bias from the step's global load (``TopKRouter.update_bias``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetrain.config.job import JobConfig
from moetrain.config.routers import TopKRouterConfig
from moetrain.moe.routers.topk import TopKRouter
from moetrain.training.callbacks import Callback, StepResult

if TYPE_CHECKING:
    from moetrain.training.trainer import Trainer


def balancing_callbacks(cfg: JobConfig) -> list[Callback]:
    router = cfg.moe.router if cfg.moe is not None else None
    if isinstance(router, TopKRouterConfig) and router.bias_update_rate > 0:
        return [BiasBalancing()]
    return []


class BiasBalancing(Callback):
    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        for module in trainer.model.modules():
            if isinstance(module, TopKRouter) and module.balances_by_bias:
                module.update_bias()
