"""Router registry: one builder from a router config (``moetrain.config.routers``) to its router.

Add a router by writing ``routers/<name>.py`` (a :class:`~moetrain.moe.routers.base.Router` subclass), its
config in ``moetrain/config/routers.py``, and an entry in ``BUILDERS``. A router defined outside the
package registers itself with :func:`register_router` (see docs/routers.md, "Adding a router"); what it
needs between optimizer steps it declares itself (``declare_hooks``, :mod:`moetrain.moe.hooks`), so
nothing under ``moetrain/training/`` changes.
"""

from __future__ import annotations

from collections.abc import Callable

from moetrain.config.registry import register_router_config
from moetrain.config.routers import (
    BaseLayerRouterConfig,
    ExpertChoiceRouterConfig,
    HashRouterConfig,
    RouterConfig,
    StableMoERouterConfig,
    TopKRouterConfig,
)
from moetrain.kernels import KernelBackend
from moetrain.moe.routers.base import Router
from moetrain.moe.routers.base_layer import BaseLayerRouter
from moetrain.moe.routers.expert_choice import ExpertChoiceRouter
from moetrain.moe.routers.hash import HashRouter
from moetrain.moe.routers.stablemoe import StableMoERouter
from moetrain.moe.routers.topk import TopKRouter

# config class -> builder(cfg, *, d_model, num_experts, vocab_size, backend) -> Router
RouterBuilder = Callable[..., Router]
BUILDERS: dict[type, RouterBuilder] = {
    TopKRouterConfig: lambda cfg, *, d_model, num_experts, vocab_size, backend: TopKRouter(
        cfg, d_model, num_experts, backend
    ),
    StableMoERouterConfig: lambda cfg, *, d_model, num_experts, vocab_size, backend: StableMoERouter(
        cfg, d_model, num_experts, vocab_size, backend
    ),
    BaseLayerRouterConfig: lambda cfg, *, d_model, num_experts, vocab_size, backend: BaseLayerRouter(
        cfg, d_model, num_experts, backend
    ),
    HashRouterConfig: lambda cfg, *, d_model, num_experts, vocab_size, backend: HashRouter(
        cfg, num_experts, vocab_size
    ),
    ExpertChoiceRouterConfig: lambda cfg, *, d_model, num_experts, vocab_size, backend: ExpertChoiceRouter(
        cfg, d_model, num_experts
    ),
}


def register_router(config: type, build: RouterBuilder) -> None:
    """Make ``moe.router: {kind: ...}`` of ``config`` build a router with ``build`` (this process).

    ``config``: a ``moetrain.config.schema.StrictModel`` with ``kind: Literal["name"]`` and the router's
    fields; ``build(cfg, *, d_model, num_experts, vocab_size, backend)`` returns a
    :class:`~moetrain.moe.routers.base.Router`."""
    register_router_config(config)
    BUILDERS[config] = build


def build_router(
    cfg: RouterConfig, *, d_model: int, num_experts: int, vocab_size: int, backend: KernelBackend
) -> Router:
    """The router for ``cfg``, for one process; ``parallelize`` sets its ``stats_group`` later. A config
    with ``trainable: false`` (top-k, expert-choice, BASE) gives a router whose parameters do not require
    gradients, which :func:`moetrain.training.optim.param_groups` leaves out of the optimizer."""
    build = BUILDERS.get(type(cfg))
    if build is None:
        raise TypeError(f"no router for config {type(cfg).__name__}: register it with register_router")
    router = build(cfg, d_model=d_model, num_experts=num_experts, vocab_size=vocab_size, backend=backend)
    if not getattr(cfg, "trainable", True):  # moe.router.trainable: false -> in no optimizer group (optim.py)
        router.requires_grad_(False)
    return router
