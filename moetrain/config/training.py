"""Config of training: the loop, the optimizer, checkpoints and logging."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, field_validator, model_validator

from moetrain.config.schema import StrictModel

# What backward recomputes instead of keeping (moetrain/model.py, docs/parallelism.md).
ActivationCheckpointing = Literal["none", "moe", "block"]


class TrainConfig(StrictModel):
    steps: int = Field(1000, ge=1, description="optimizer steps (sets the LR schedule)")
    stop_at_step: int | None = Field(None, ge=1, description="end this run early at this step, schedule unchanged")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro-step")
    grad_accum_steps: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="fp32, or bf16 compute with fp32 master weights and optimizer state (docs/parallelism.md, "
        "'Precision'; on the CPU attention still runs in fp32 and expert rows are padded for speed, "
        "docs/benchmarks.md); fp16 is refused: it needs loss scaling, which no moetrain path is tested with",
    )
    eval_interval: int = Field(0, ge=0, description="steps between evaluations (0: only at the end)")
    eval_batches: int = Field(8, ge=1, description="validation micro-batches per rank")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a non-finite loss or gradient norm: stop before the optimizer step, or skip that step",
    )
    nonfinite_max_skips: int = Field(10, ge=1, description="skip: stop after this many consecutive skipped steps")
    deterministic: bool = Field(
        False, description="guarantee bitwise-reproducible runs at a fixed thread count (README, Resuming)"
    )
    collective_timeout_s: int = Field(
        600, ge=1, description="seconds a collective waits for a stuck rank before the job fails (docs/reliability.md)"
    )
    retain_host_memory: bool = Field(
        True,
        description="CPU training on glibc: keep freed memory in the process instead of returning it to the OS, so "
        "large per-step tensors stop page-faulting; resident memory stays at its peak (docs/benchmarks.md)",
    )
    zero_on_one_process: bool = Field(
        False,
        description="one process (world size 1) with deepspeed.zero_optimization.stage 1 or 2: false runs "
        "DeepSpeed's stage-0 path, since one rank has nothing to partition (the same update, less memory and "
        "time); true keeps ZeRO's machinery, e.g. to try a ZeRO config on one process (docs/parallelism.md)",
    )
    cpu_kernel_cache: int | None = Field(
        256,
        ge=1,
        description="CPU: how many oneDNN matmul kernels to keep (ONEDNN_PRIMITIVE_CACHE_CAPACITY and ideep's "
        "LRU_CACHE_CAPACITY; bf16 matmuls use them). Experts see new row counts every step, so the library default "
        "(1024 per cache) fills with kernels never reused; null keeps the defaults; the environment variables, when "
        "set, win (docs/benchmarks.md)",
    )
    activation_checkpointing: ActivationCheckpointing = Field(
        "none",
        description="recompute activations in backward instead of keeping them: moe: each MoE layer (router, "
        "dispatch, experts, combine); block: each whole block (attention + FFN or MoE); none (docs/parallelism.md)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the dense parts of every block (attention, norms, dense FFN); MoE layers stay "
        "eager (docs/parallelism.md)",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, v: object) -> object:
        if v == "fp16":
            raise ValueError(
                "'fp16' is not supported: fp16 training needs dynamic loss scaling, and no moetrain path (grouped "
                "experts, the EP gradient norm, checkpoints of DeepSpeed's fp16 optimizers) is tested with it; use "
                "bf16 (the same memory, no loss scaling) or fp32"
            )
        return v


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr = lr * min_lr_ratio")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0: off)")
    fused: bool = Field(
        True,
        description="torch's fused AdamW (one kernel over all parameters; the same update up to rounding); "
        "false: its per-parameter loop",
    )


class CheckpointConfig(StrictModel):
    interval: int = Field(0, ge=0, description="save every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="committed checkpoints to keep")
    resume: str = Field(
        "auto", description="auto: the latest valid checkpoint in the run dir; none; or a checkpoint path"
    )
    save_at_end: bool = True
    allow_data_change: bool = Field(
        False,
        description="resume although the data's tokens differ from the checkpoint's (a changed corpus or tokenizer); "
        "logged. Moving or copying the same corpus needs no override: resume compares the tokens' content",
    )


class WandbConfig(StrictModel):
    enabled: bool = False
    project: str = "moetrain"
    entity: str | None = None
    mode: Literal["offline", "online"] = Field("offline", description="offline unless told otherwise")
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        # find_spec looks for the package without importing it (wandb is heavy, and optional).
        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "enabled is true but the wandb package is not installed; install it with "
                'pip install -e ".[wandb]" (or pip install wandb), or set logging.wandb.enabled=false'
            )
        return self


class LoggingConfig(StrictModel):
    interval: int = Field(10, ge=1, description="steps per summary line / metrics.jsonl record")
    progress: Literal["auto", "on", "off"] = Field("auto", description="auto: a progress bar on a terminal only")
    wandb: WandbConfig = WandbConfig()
