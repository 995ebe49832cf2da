"""Router registry: the tagged union of router configs, and one builder.

Add a router by writing ``routers/<name>.py`` (its ``*RouterConfig`` with a ``kind`` literal, and a
:class:`~moetrain.moe.routing.Router` subclass) and listing it in both places below.
"""

from __future__ import annotations

from typing import Annotated, Union

import torch.distributed as dist
from pydantic import Field

from moetrain.kernels import KernelBackend
from moetrain.moe.routers.base import BaseRouter, BaseRouterConfig
from moetrain.moe.routers.hash import HashRouter, HashRouterConfig
from moetrain.moe.routers.stablemoe import StableMoERouter, StableMoERouterConfig
from moetrain.moe.routers.topk import TopKRouter, TopKRouterConfig
from moetrain.moe.routing import Router

RouterConfig = Annotated[
    Union[TopKRouterConfig, StableMoERouterConfig, BaseRouterConfig, HashRouterConfig], Field(discriminator="kind")
]


def build_router(
    cfg: RouterConfig,
    *,
    d_model: int,
    num_experts: int,
    vocab_size: int,
    backend: KernelBackend,
    stats_group: dist.ProcessGroup | None,
) -> Router:
    if isinstance(cfg, TopKRouterConfig):
        return TopKRouter(cfg, d_model, num_experts, backend, stats_group)
    if isinstance(cfg, StableMoERouterConfig):
        return StableMoERouter(cfg, d_model, num_experts, vocab_size, backend, stats_group)
    if isinstance(cfg, BaseRouterConfig):
        return BaseRouter(cfg, d_model, num_experts, backend)
    if isinstance(cfg, HashRouterConfig):
        return HashRouter(cfg, num_experts, vocab_size)
    raise TypeError(f"no router for config {type(cfg).__name__}")
