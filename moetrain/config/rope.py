"""Config of rotary-position scaling (``model.rope_scaling``): one model per kind, a union tagged by ``kind``.

Each kind is one of Hugging Face ``transformers``' ``ROPE_INIT_FUNCTIONS`` (``modeling_rope_utils.py``),
computed the same way in ``moetrain/backbone/rope.py``; the field names are theirs. ``dynamic`` (NTK) is
not offered: transformers' frequencies depend on the longest sequence its module has seen since the last
reset, state that no function of the positions reproduces (docs/import.md).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from moetrain.config.schema import StrictModel


class LinearRopeScaling(StrictModel):
    kind: Literal["linear"] = "linear"
    factor: float = Field(gt=0.0, description="every frequency divided by factor (positions interpolated)")


class YarnRopeScaling(StrictModel):
    kind: Literal["yarn"] = "yarn"
    factor: float = Field(gt=0.0, description="context extension factor")
    original_max_position_embeddings: int = Field(ge=1, description="the context length pre-trained with")
    beta_fast: float = Field(32.0, description="extrapolation boundary of the ramp (rotations); 0 means 32")
    beta_slow: float = Field(1.0, description="interpolation boundary of the ramp (rotations); 0 means 1")
    mscale: float | None = Field(None, description="with mscale_all_dim: the cos/sin factor's numerator scale")
    mscale_all_dim: float | None = Field(
        None,
        description="with mscale: the cos/sin factor's denominator scale; multi-head latent attention also "
        "multiplies its softmax scale by (0.1 * mscale_all_dim * ln(factor) + 1)^2 (DeepSeek-V3)",
    )
    attention_factor: float | None = Field(
        None, description="the cos/sin factor itself; null: from factor, mscale and mscale_all_dim"
    )
    truncate: bool = Field(True, description="round the correction range to whole dimensions")


class Llama3RopeScaling(StrictModel):
    kind: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0.0, description="division of the low frequencies")
    low_freq_factor: float = Field(gt=0.0)
    high_freq_factor: float = Field(gt=0.0)
    original_max_position_embeddings: int = Field(ge=1, description="the context length pre-trained with")

    @model_validator(mode="after")
    def _check(self) -> Llama3RopeScaling:
        if self.high_freq_factor == self.low_freq_factor:
            raise ValueError(
                f"model.rope_scaling.high_freq_factor ({self.high_freq_factor}) must differ from low_freq_factor "
                "(the smoothing divides by their difference)"
            )
        return self


RopeScaling = Annotated[Union[LinearRopeScaling, YarnRopeScaling, Llama3RopeScaling], Field(discriminator="kind")]
