"""The ``deepspeed:`` block of a job config: passed to DeepSpeed verbatim, except the fields moetrain owns.

moetrain fills the fields below from its own config; a user value in the block that disagrees is
rejected (an equal value is accepted). Pure validation: this module imports nothing that runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moetrain.config.zero3 import check_zero3

if TYPE_CHECKING:
    from moetrain.config.job import JobConfig

OWNED_ELSEWHERE = {
    "optimizer": "moetrain builds AdamW with its own parameter groups from optim.*",
    "scheduler": "moetrain builds the warmup + decay schedule from optim.*",
}


def owned_fields(cfg: "JobConfig") -> dict[str, tuple[str, Any]]:
    """DeepSpeed key -> (the moetrain field that sets it, its value)."""
    return {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", cfg.train.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", cfg.train.grad_accum_steps),
        "gradient_clipping": ("optim.grad_clip", cfg.optim.grad_clip),
    }


def check_deepspeed_block(cfg: "JobConfig") -> None:
    """Reject a ``deepspeed:`` block that fights moetrain's own settings (raises ValueError)."""
    block = cfg.deepspeed
    for key, why in OWNED_ELSEWHERE.items():
        if key in block:
            raise ValueError(f"deepspeed.{key}: not allowed ({why}); remove it and set optim.* instead")
    for key, (field, value) in owned_fields(cfg).items():
        if key in block and block[key] != value:
            raise ValueError(
                f"deepspeed.{key} ({block[key]!r}) conflicts with {field} ({value!r}); "
                f"set {field} and remove deepspeed.{key}"
            )
    if isinstance(block.get("fp16"), dict) and block["fp16"].get("enabled"):
        raise ValueError(
            "deepspeed.fp16.enabled (true): fp16 training is not supported (it needs loss scaling, which no moetrain "
            "path is tested with); remove it and set train.precision: bf16"
        )
    for fmt in ("bf16",):
        enabled = isinstance(block.get(fmt), dict) and block[fmt].get("enabled")
        if enabled and cfg.train.precision != fmt:
            raise ValueError(
                f"deepspeed.{fmt}.enabled (true) conflicts with train.precision ({cfg.train.precision!r}); "
                f"set train.precision: {fmt} instead"
            )
    stage = zero_stage(block)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_optimization.stage ({stage!r}) must be 0, 1, 2 or 3")
    if stage == 3:
        check_zero3(cfg)


def zero_stage(block: dict[str, Any]) -> Any:
    """``deepspeed.zero_optimization.stage`` (0 when unset; None when the block is not a mapping)."""
    zero = block.get("zero_optimization", {})
    return zero.get("stage", 0) if isinstance(zero, dict) else None
