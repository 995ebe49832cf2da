"""A router written outside moetrain, in a few lines, trained through moetrain's CLI.

``python tests/plugins/shift_router.py train CONFIG moe.router={kind: shift} ...`` is ``moetrain train``
with this router registered (``moetrain.moe.routers.register_router``). Token id t goes to expert
``(t + shift) mod E`` with gate 1; a hook the router declares (``declare_hooks``) moves ``shift`` by
``stride`` after every optimizer step and logs it. Nothing under ``moetrain/training/`` knows of it.
"""

from __future__ import annotations

from typing import Literal

import torch

from moetrain.config.schema import StrictModel
from moetrain.moe.hooks import TrainingHooks
from moetrain.moe.routers import register_router
from moetrain.moe.routers.base import Router, RoutingDecision, zero_loss


class ShiftRouterConfig(StrictModel):
    kind: Literal["shift"] = "shift"
    stride: int = 1


class ShiftRouter(Router):
    def __init__(self, cfg: ShiftRouterConfig, num_experts: int) -> None:
        super().__init__()
        self.cfg, self.num_experts, self.top_k = cfg, num_experts, 1
        self.register_buffer("shift", torch.zeros((), dtype=torch.int64))  # in every checkpoint

    def forward(self, x_TD, token_ids_T, group_size=None) -> RoutingDecision:
        ids_TK = ((token_ids_T + self.shift) % self.num_experts)[:, None]
        return RoutingDecision(ids_TK, torch.ones(ids_TK.shape, device=x_TD.device), zero_loss(x_TD))

    @classmethod
    def declare_hooks(cls, routers: list[ShiftRouter]) -> list[TrainingHooks]:
        return [Shift(routers)]


class Shift(TrainingHooks):
    def __init__(self, routers: list[ShiftRouter]) -> None:
        self.routers = routers

    def after_step(self, ctx, report) -> None:
        for router in self.routers:
            router.shift += router.cfg.stride
        ctx.log(report.step, {"shift": int(self.routers[0].shift)})


register_router(ShiftRouterConfig, lambda cfg, *, num_experts, **_: ShiftRouter(cfg, num_experts))

if __name__ == "__main__":
    from moetrain.cli import entry

    entry()
