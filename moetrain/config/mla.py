"""Config of multi-head latent attention (``model.attention: mla``, ``model.mla``; DeepSeek-V2/V3).

The field names are DeepSeek's (``config.json``); ``moetrain/backbone/mla.py`` computes it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from moetrain.config.schema import StrictModel


class MLAConfig(StrictModel):
    q_lora_rank: int | None = Field(
        None, ge=1, description="rank of the low-rank query (q_a_proj, RMSNorm, q_b_proj); null: one q projection"
    )
    kv_lora_rank: int = Field(ge=1, description="rank of the compressed key/value latent (what the KV cache holds)")
    qk_nope_head_dim: int = Field(ge=1, description="per-head query/key dims without rotary positions")
    qk_rope_head_dim: int = Field(
        ge=2, description="per-head query dims with rotary positions; the rotary key dims are shared by all heads"
    )
    v_head_dim: int = Field(ge=1, description="per-head value dims")
    latent_norm_eps: float = Field(
        1e-6, gt=0.0, description="epsilon of the RMSNorms of the query and key/value latents (DeepSeek: 1e-6)"
    )

    @model_validator(mode="after")
    def _check(self) -> MLAConfig:
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"model.mla.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: rotary positions rotate pairs"
            )
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim
