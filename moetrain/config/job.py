"""The job config: one training job, nesting every component's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from moetrain.config.data import DataConfig
from moetrain.config.deepspeed import check_deepspeed_block
from moetrain.config.launch import LaunchConfig
from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.config.schema import StrictModel
from moetrain.config.training import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from moetrain.errors import UserError


class JobConfig(StrictModel):
    """One training job. ``moe: null`` gives the dense baseline."""

    name: str = "moetrain"
    run_dir: str | None = Field(None, description="defaults to runs/<name>")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    moe: MoEConfig | None = MoEConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    launch: LaunchConfig = Field(LaunchConfig(), description="how `moetrain launch` starts the job (docs/launching.md)")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="passed to DeepSpeed verbatim (moetrain fills batch, precision, clipping)"
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        m = self.model
        if self.data.seq_len > m.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
        if self.moe is not None:
            if "expert_type" not in self.moe.model_fields_set:  # experts follow the backbone's FFN
                self.moe.__dict__["expert_type"] = m.ffn_type
            self.moe.check_against_model(m.n_layers)
            if self.moe.router.kind == "expert_choice" and self.data.isolated:
                raise ValueError(
                    "moe.router.kind: expert_choice lets each expert choose among all the tokens of a row, so the "
                    "samples packed into a row (chat data, data.document_masking) and their padding would decide "
                    "each other's experts: their isolation cannot be exact. Use another router (topk, stablemoe, "
                    "hash, base) for this data"
                )
        check_deepspeed_block(self)
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def check_world_size(self, world_size: int) -> None:
        """Check the parallel layout for ``world_size`` ranks (``moetrain validate --world-size``)."""
        check_world_size(world_size, self.ep_size)

    @property
    def ep_size(self) -> int:
        return self.moe.expert_parallel_size if self.moe is not None else 1


def check_world_size(world_size: int, ep_size: int) -> None:
    """The one check of a parallel layout against a world size (``num_experts % ep_size`` needs no world
    size: MoEConfig validates it with the config)."""
    if world_size < 1:
        raise UserError(f"world size ({world_size}) must be >= 1")
    if world_size % ep_size:
        raise UserError(
            f"world size ({world_size}) must be divisible by moe.expert_parallel_size ({ep_size}); "
            f"use a world size that is a multiple of {ep_size} or lower expert_parallel_size"
        )
