"""Config of the model: the transformer backbone and its MoE layers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moetrain.config.routers import RouterConfig, TopKRouterConfig
from moetrain.config.schema import StrictModel

ExpertType = Literal["gelu", "swiglu", "stacked"]


class ModelConfig(StrictModel):
    vocab_size: int | None = Field(None, ge=2, description="default: the tokenizer's vocabulary")
    d_model: int = Field(128, ge=1)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    d_ff: int = Field(512, ge=1)
    ffn_type: Literal["gelu", "swiglu"] = "gelu"
    max_seq_len: int = Field(256, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        return self


class FluctuationConfig(StrictModel):
    interval: int = Field(0, ge=0, description="optimizer steps between routing probes (0: off; the paper: 500)")
    blocks: int = Field(16, ge=1, description="validation blocks (data.seq_len tokens each) in the probe set")


class MoEConfig(StrictModel):
    placement: Literal["replace_ffn", "insert"] = Field(
        "replace_ffn",
        description="replace_ffn: the FFN of every `every`-th block is an MoE layer; "
        "insert: an extra MoE layer after each block in `insert_after` (the StableMoE paper)",
    )
    every: int = Field(1, ge=1, description="replace_ffn: MoE in blocks every, 2*every, ... (1-based)")
    insert_after: list[int] | None = Field(None, description="insert: 0-based block indices; default the middle block")
    num_experts: int = Field(8, ge=1)
    expert_type: ExpertType = "gelu"
    expert_hidden: int | None = Field(None, ge=1, description="expert FFN width; default model.d_ff")
    sublayers: int = Field(3, ge=1, description="stacked experts: residual FFN sublayers per expert")
    capacity_factor: float | None = Field(
        None, gt=0, description="null = dropless; else slots per expert = ceil(cf*T*K/E)"
    )
    expert_parallel_size: int = Field(1, ge=1, description="ranks the experts are sharded over")
    kernels: Literal["auto", "triton", "torch"] = "auto"
    router: RouterConfig = TopKRouterConfig()
    fluctuation: FluctuationConfig = Field(
        FluctuationConfig(), description="routing-fluctuation probe (moetrain/training/fluctuation.py)"
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        ep = self.expert_parallel_size
        if self.num_experts % ep:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be divisible by moe.expert_parallel_size ({ep})"
            )
        top_k = getattr(self.router, "top_k", 1)
        if top_k > self.num_experts:
            raise ValueError(f"moe.router.top_k ({top_k}) must be <= moe.num_experts ({self.num_experts})")
        return self

    def check_against_model(self, n_layers: int) -> None:
        for i in self.insert_after or []:
            if not 0 <= i < n_layers:
                raise ValueError(
                    f"moe.insert_after ({self.insert_after}) holds {i}, outside the blocks 0..{n_layers - 1}"
                )
        if self.placement == "replace_ffn" and self.every > n_layers:
            raise ValueError(f"moe.every ({self.every}) must be <= model.n_layers ({n_layers})")

    def moe_blocks(self, n_layers: int) -> list[int]:
        """0-based block indices that hold (replace_ffn) or are followed by (insert) an MoE layer."""
        if self.placement == "replace_ffn":
            return [i for i in range(n_layers) if (i + 1) % self.every == 0]
        return sorted(self.insert_after) if self.insert_after is not None else [n_layers // 2 - 1]
