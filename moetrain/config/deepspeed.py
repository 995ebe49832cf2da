"""The ``deepspeed:`` block of a job config: passed to DeepSpeed verbatim, except the fields moetrain owns.

moetrain fills the fields below from its own config; a user value in the block that disagrees is
rejected (an equal value is accepted). Pure validation: this module imports nothing that runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moetrain.config.zero3 import check_zero3

if TYPE_CHECKING:
    from moetrain.config.job import JobConfig

# The ZeRO stages moetrain runs with expert parallelism. The one switch: config validation and the
# memory planner (moetrain/planning/) both read it.
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)

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
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"deepspeed.zero_optimization.stage ({stage!r}) must be 0, 1, 2 or 3")
    if stage == 3:
        check_zero3(cfg)  # refuses offload at stage 3 too
    else:
        check_offload_block(block.get("zero_optimization") or {}, stage)


def partitions_nothing(
    stage: Any, world_size: int, offload: bool, zero_on_one_process: bool, precision: str, accum_dtype: Any
) -> bool:
    """ZeRO-1/2 on one process: the one data-parallel rank owns every partition, so moetrain runs
    DeepSpeed's stage-0 path instead (``train.zero_on_one_process`` false, the default): the same
    update without ZeRO's flat fp32 copy of the weights or its per-step flattening of the gradients
    (docs/parallelism.md, "ZeRO on one process"). ZeRO stays with optimizer offload (ZeRO's CPU Adam) and
    with a ``deepspeed.data_types.grad_accum_dtype`` other than the precision (DeepSpeed refuses that mix
    at stage 0; bf16 with fp32 accumulation is its BF16_Optimizer). The trainer and the planner decide
    with this one rule."""
    same_accum = accum_dtype in (None, precision)
    return world_size == 1 and stage in (1, 2) and not offload and not zero_on_one_process and same_accum


def job_partitions_nothing(cfg: "JobConfig", stage: Any, world_size: int, offload: bool) -> bool:
    """:func:`partitions_nothing` for ``cfg``'s precision, accumulation dtype and ``train.zero_on_one_process``
    in a layout of ``stage`` / ``world_size`` / ``offload`` (the job's own, or one the planner tries)."""
    accum = (cfg.deepspeed.get("data_types") or {}).get("grad_accum_dtype")
    return partitions_nothing(stage, world_size, offload, cfg.train.zero_on_one_process, cfg.train.precision, accum)


def zero_stage(block: dict[str, Any]) -> Any:
    """``deepspeed.zero_optimization.stage`` (0 when unset; None when the block is not a mapping)."""
    zero = block.get("zero_optimization", {})
    return zero.get("stage", 0) if isinstance(zero, dict) else None


def offload_device(block: dict[str, Any]) -> str:
    """``deepspeed.zero_optimization.offload_optimizer.device``: ``cpu`` or ``none``."""
    zero = block.get("zero_optimization") or {}
    return str((zero.get("offload_optimizer") or {}).get("device", "none"))


def check_offload_block(zero: dict[str, Any], stage: int) -> None:
    """Offload as moetrain runs it: the optimizer state (fp32 master, Adam moments) on the CPU with
    DeepSpeed's CPU Adam, under ZeRO-1/2; not parameters (ZeRO-3 only) and not NVMe."""
    if zero.get("offload_param") not in (None, {}) and (zero["offload_param"] or {}).get("device", "none") != "none":
        raise ValueError(
            "deepspeed.zero_optimization.offload_param: parameter offload needs ZeRO-3, and moetrain's ZeRO-3 "
            "does not offload; offload the optimizer state under ZeRO-1/2 instead (offload_optimizer: {device: cpu}), "
            "or use ZeRO-3 without offload"
        )
    offload = zero.get("offload_optimizer")
    if offload in (None, {}):
        return
    if not isinstance(offload, dict):
        raise ValueError(
            f"deepspeed.zero_optimization.offload_optimizer ({offload!r}) must be a mapping, e.g. {{device: cpu}}"
        )
    device = offload.get("device", "none")
    if device == "none":
        return
    if device != "cpu":
        raise ValueError(
            f"deepspeed.zero_optimization.offload_optimizer.device ({device!r}) must be cpu or none "
            "(moetrain does not run NVMe offload)"
        )
    if stage not in (1, 2):
        raise ValueError(
            f"deepspeed.zero_optimization.offload_optimizer.device (cpu) needs ZeRO stage 1 or 2, but "
            f"deepspeed.zero_optimization.stage is {stage}; set deepspeed.zero_optimization.stage=2"
        )
