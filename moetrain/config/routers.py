"""Router configs: one model per router kind, joined into a union tagged by ``kind``.

Add a router by adding its config here (with a ``kind`` literal) and its module under
``moetrain/moe/routers/`` (registered in ``moetrain/moe/routers/__init__.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from moetrain.config.schema import StrictModel


class TopKRouterConfig(StrictModel):
    kind: Literal["topk"] = "topk"
    top_k: int = Field(1, ge=1, description="experts per token (1 = Switch, 2 = GShard)")
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = Field(False, description="rescale the k gates of a token to sum to 1")
    load_balance_coeff: float = Field(0.01, ge=0.0, description="weight of the Switch load-balance loss")
    z_loss_coeff: float = Field(0.0, ge=0.0, description="weight of the router z-loss")
    init: Literal["normal", "orthogonal"] = Field(
        "normal", description="normal(0, init_std); orthogonal with gain init_gain (the StableMoE code's Switch)"
    )
    init_std: float = Field(0.02, gt=0.0)
    init_gain: float = Field(0.1, gt=0.0, description="gain of the orthogonal init")


class StableMoERouterConfig(StrictModel):
    kind: Literal["stablemoe"] = "stablemoe"
    balance_coeff: float = Field(0.3, ge=0.0, description="alpha of the balance loss (paper and code: 0.3)")
    distill_coeff: float = Field(
        0.3, ge=0.0, description="weight of the distillation loss (official code: 0.3; paper Eq. 11: 1.0)"
    )
    distill_dim: int = Field(50, ge=1, description="distilled router: token-embedding dimension (paper: 50)")
    stage1_steps: int | None = Field(
        None, ge=0, description="optimizer steps in stage 1; null = ceil(10% of train.steps) (paper: 6K of 60K)"
    )
    eval_routing: Literal["distilled", "backbone"] = Field(
        "distilled",
        description="evaluation routing during stage 1 (the official code: distilled); stage 2 is always distilled",
    )
    init_gain: float = Field(0.1, gt=0.0, description="gain of the orthogonal init of both centroid matrices")

    def resolved_stage1_steps(self, train_steps: int) -> int:
        return self.stage1_steps if self.stage1_steps is not None else -(-train_steps // 10)


class BaseLayerRouterConfig(StrictModel):
    kind: Literal["base"] = "base"
    assignment: Literal["exact", "auction"] = Field(
        "exact",
        description="exact: the optimal balanced assignment; auction: fairseq's epsilon-optimal auction (the papers)",
    )
    auction_epsilon: float = Field(
        0.02, gt=0.0, description="auction: eps as a fraction of the score range (code: 1/50)"
    )
    init_gain: float = Field(0.1, gt=0.0, description="gain of the orthogonal init of the centroids")


class HashRouterConfig(StrictModel):
    kind: Literal["hash"] = "hash"
    table: Literal["random", "balanced"] = Field(
        "random", description="random (the StableMoE paper) or frequency-balanced"
    )
    seed: int = Field(0, description="seed of the random table")
    balance_tokens: int = Field(
        50_000_000, ge=1, description="balanced: count frequencies over this many training tokens (a prefix)"
    )


RouterConfig = Annotated[
    Union[TopKRouterConfig, StableMoERouterConfig, BaseLayerRouterConfig, HashRouterConfig],
    Field(discriminator="kind"),
]
