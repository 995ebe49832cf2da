"""Router registry: one builder from a router config (``moetrain.config.routers``) to its router.

Add a router by writing ``routers/<name>.py`` (a :class:`~moetrain.moe.routing.Router` subclass), its
config in ``moetrain/config/routers.py``, and a branch below.
"""

from __future__ import annotations

from moetrain.config.routers import (
    BaseLayerRouterConfig,
    ExpertChoiceRouterConfig,
    HashRouterConfig,
    RouterConfig,
    StableMoERouterConfig,
    TopKRouterConfig,
)
from moetrain.kernels import KernelBackend
from moetrain.moe.routers.base_layer import BaseLayerRouter
from moetrain.moe.routers.expert_choice import ExpertChoiceRouter
from moetrain.moe.routers.hash import HashRouter
from moetrain.moe.routers.stablemoe import StableMoERouter
from moetrain.moe.routers.topk import TopKRouter
from moetrain.moe.routing import Router


def build_router(
    cfg: RouterConfig, *, d_model: int, num_experts: int, vocab_size: int, backend: KernelBackend
) -> Router:
    """The router for ``cfg``, for one process; ``parallelize`` sets its ``stats_group`` later."""
    if isinstance(cfg, TopKRouterConfig):
        return TopKRouter(cfg, d_model, num_experts, backend)
    if isinstance(cfg, StableMoERouterConfig):
        return StableMoERouter(cfg, d_model, num_experts, vocab_size, backend)
    if isinstance(cfg, BaseLayerRouterConfig):
        return BaseLayerRouter(cfg, d_model, num_experts, backend)
    if isinstance(cfg, HashRouterConfig):
        return HashRouter(cfg, num_experts, vocab_size)
    if isinstance(cfg, ExpertChoiceRouterConfig):
        return ExpertChoiceRouter(cfg, d_model, num_experts)
    raise TypeError(f"no router for config {type(cfg).__name__}")
