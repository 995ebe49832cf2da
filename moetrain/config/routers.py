"""Router configs: one model per router kind, joined into a union tagged by ``kind``.

Add a router by adding its config here (with a ``kind`` literal) and its module under
``moetrain/moe/routers/`` (registered in ``moetrain/moe/routers/__init__.py``). A router defined outside
the package registers both at once with :func:`moetrain.moe.routers.register_router`, which calls
:func:`moetrain.config.registry.register_router_config`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

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
    seq_aux_coeff: float = Field(
        0.0,
        ge=0.0,
        description="weight of DeepSeek-V3's sequence-wise balance loss (per sequence: E/(kS) * sum_i f_i P_i; "
        "DeepSeek-V3: 0.0001 beside bias balancing)",
    )
    bias_update_rate: float = Field(
        0.0,
        ge=0.0,
        description="auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores to choose "
        "experts (never to the gates), moved by +-rate * sign(mean load - load) after each optimizer step from "
        "the global counts; 0 = off (DeepSeek-V3: 0.001; set load_balance_coeff: 0 to drop the aux loss)",
    )
    correction_bias: bool = Field(
        False,
        description="a fixed per-expert selection bias besides the learned steps (DeepSeek-V3's "
        "e_score_correction_bias, set by import; kept as fp32 bits so a bf16 cast cannot round it); "
        "bias_update_rate > 0 moves the bias from there",
    )
    num_groups: int = Field(
        1,
        ge=1,
        description="group-limited routing (DeepSeek-V3's n_group): the experts form num_groups equal groups of "
        "consecutive ids; a token chooses its top_k among the topk_groups groups with the largest sum of their "
        "two best (biased) scores; 1 = no groups",
    )
    topk_groups: int | None = Field(
        None, ge=1, description="groups a token may choose from (DeepSeek-V3's topk_group); null = num_groups"
    )
    gate_scale: float = Field(
        1.0, gt=0.0, description="multiplies every gate, after renormalize (DeepSeek-V3's routed_scaling_factor)"
    )
    trainable: bool = Field(
        True,
        description="false: the router's parameters are frozen (requires_grad false, in no optimizer group); its "
        "gates still scale the experts' outputs and the backbone still learns through them (docs/finetuning.md)",
    )

    @model_validator(mode="after")
    def _check(self) -> TopKRouterConfig:
        if self.topk_groups is not None and self.topk_groups > self.num_groups:
            raise ValueError(
                f"moe.router.topk_groups ({self.topk_groups}) must be <= moe.router.num_groups ({self.num_groups})"
            )
        return self

    def check_groups(self, num_experts: int) -> None:
        """Group-limited routing needs equal groups of at least 2 experts (the group score sums the best two)
        holding at least top_k experts in the groups a token may use."""
        if self.num_groups == 1:
            return
        per_group, rem = divmod(num_experts, self.num_groups)
        if rem or per_group < 2:
            raise ValueError(
                f"moe.router.num_groups ({self.num_groups}) must divide the experts of a layer ({num_experts}) into "
                "groups of at least 2 (a group's score is the sum of its two best scores)"
            )
        usable = (self.topk_groups or self.num_groups) * per_group
        if self.top_k > usable:
            raise ValueError(
                f"moe.router.top_k ({self.top_k}) must be <= the experts of the topk_groups "
                f"({self.topk_groups}) groups a token may use ({usable})"
            )


class AdaptiveSwitchConfig(StrictModel):
    """``switch: adaptive``: end stage 1 once the distilled router has learned the routing.

    Checked after every optimizer step over the last ``window`` steps (all of them in stage 1):
    the distilled router's agreement with the backbone argmax on the training tokens, averaged over
    the window, is at least ``min_agreement`` in every MoE layer, and the distilled router's
    busiest expert takes at most ``max_load`` times the mean load (its loads summed over the window).
    """

    window: int = Field(50, ge=1, description="steps the agreement and load are averaged over")
    min_agreement: float = Field(
        0.9, gt=0.0, le=1.0, description="distilled-vs-backbone agreement needed (fraction of tokens)"
    )
    max_load: float = Field(
        2.0, ge=1.0, description="largest allowed max/mean expert load of the distilled router (1 = balanced)"
    )


class StableMoERouterConfig(StrictModel):
    kind: Literal["stablemoe"] = "stablemoe"
    balance_coeff: float = Field(0.3, ge=0.0, description="alpha of the balance loss (paper and code: 0.3)")
    distill_coeff: float = Field(
        0.3, ge=0.0, description="weight of the distillation loss (official code: 0.3; paper Eq. 11: 1.0)"
    )
    distill_dim: int = Field(50, ge=1, description="distilled router: token-embedding dimension (paper: 50)")
    switch: Literal["steps", "adaptive"] = Field(
        "steps",
        description="when stage 1 ends: steps = after stage1_steps; adaptive = when `adaptive`'s criteria hold "
        "(at stage1_steps at the latest)",
    )
    stage1_steps: int | None = Field(
        None,
        ge=0,
        description="optimizer steps in stage 1 (switch: adaptive -- the most); null = ceil(10% of train.steps) "
        "(paper: 6K of 60K)",
    )
    adaptive: AdaptiveSwitchConfig = Field(
        AdaptiveSwitchConfig(),
        description="switch: adaptive -- the criteria; the window also sets the statistics recorded at the switch",
    )
    eval_routing: Literal["distilled", "backbone"] = Field(
        "distilled",
        description="evaluation routing during stage 1 (the official code: distilled); stage 2 is always distilled",
    )
    init_gain: float = Field(0.1, gt=0.0, description="gain of the orthogonal init of both centroid matrices")

    @model_validator(mode="after")
    def _check(self) -> StableMoERouterConfig:
        # Non-default criteria only: a dumped config (config.yaml) holds every field and must load again.
        # The window is allowed: it also sizes the statistics recorded at a `steps` switch.
        fields = AdaptiveSwitchConfig.model_fields
        criteria = [k for k in ("min_agreement", "max_load") if getattr(self.adaptive, k) != fields[k].default]
        if self.switch == "steps" and criteria:
            given = ", ".join(f"{k}={getattr(self.adaptive, k)}" for k in criteria)
            raise ValueError(
                f"moe.router.adaptive.{criteria[0]} ({given}) only applies with moe.router.switch=adaptive, but "
                "switch is 'steps'; set moe.router.switch=adaptive or remove it"
            )
        return self

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
    trainable: bool = Field(
        True,
        description="false: the router's parameters are frozen (requires_grad false, in no optimizer group); its "
        "gates still scale the experts' outputs and the backbone still learns through them (docs/finetuning.md)",
    )


class HashRouterConfig(StrictModel):
    kind: Literal["hash"] = "hash"
    table: Literal["random", "balanced"] = Field(
        "random", description="random (the StableMoE paper) or frequency-balanced"
    )
    seed: int = Field(0, description="seed of the random table")
    balance_tokens: int = Field(
        50_000_000, ge=1, description="balanced: count frequencies over this many training tokens (a prefix)"
    )


class ExpertChoiceRouterConfig(StrictModel):
    kind: Literal["expert_choice"] = "expert_choice"
    top_k: int = Field(
        1,
        ge=1,
        description="average experts per token: each expert takes C = capacity_factor * S * top_k / E "
        "tokens of each sequence of S",
    )
    capacity_factor: float = Field(1.0, gt=0.0, description="scales C (the paper: 1 and 2)")
    init_std: float = Field(0.02, gt=0.0)
    trainable: bool = Field(
        True,
        description="false: the router's parameters are frozen (requires_grad false, in no optimizer group); its "
        "gates still scale the experts' outputs and the backbone still learns through them (docs/finetuning.md)",
    )


ROUTER_CONFIGS: list[type[StrictModel]] = [
    TopKRouterConfig,
    StableMoERouterConfig,
    BaseLayerRouterConfig,
    HashRouterConfig,
    ExpertChoiceRouterConfig,
]


def router_config_union(configs: list[type[StrictModel]]) -> Any:
    return Annotated[Union[tuple(configs)], Field(discriminator="kind")]


RouterConfig = router_config_union(ROUTER_CONFIGS)
