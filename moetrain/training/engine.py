"""The DeepSpeed engine for a job: its config block (moetrain's fields filled in) and its creation.

The ``deepspeed:`` block of the job config is checked at validation (``moetrain/config/deepspeed.py``)
and completed here; DeepSpeed's MoE contract for expert parallelism is met in
``moetrain/parallel/deepspeed_moe.py``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

from torch import nn

from moetrain.config.deepspeed import job_partitions_nothing, offload_device, owned_fields
from moetrain.config.deepspeed import zero_stage as deepspeed_zero_stage
from moetrain.config.job import JobConfig
from moetrain.errors import UserError
from moetrain.training.unfused_bf16 import undo_unfused_init_step, use_grouped_step


def build_ds_config(cfg: JobConfig, world_size: int) -> dict[str, Any]:
    ds = copy.deepcopy(cfg.deepspeed)
    for key, (_, value) in owned_fields(cfg).items():
        ds[key] = value
    if "train_batch_size" in ds:
        expected = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
        if ds["train_batch_size"] != expected:
            raise UserError(
                f"deepspeed.train_batch_size ({ds['train_batch_size']}) conflicts with train.micro_batch_size "
                f"x train.grad_accum_steps x world size ({expected}); remove deepspeed.train_batch_size"
            )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    ds.setdefault("zero_optimization", {"stage": 0})
    if unpartitioned(cfg, world_size):
        ds["zero_optimization"] = {**ds["zero_optimization"], "stage": 0}
    if moetrain_clips(ds):
        ds["gradient_clipping"] = 0.0  # moetrain clips itself (EP-aware) before engine.step()
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(cfg: JobConfig) -> int:
    """``deepspeed.zero_optimization.stage`` of the job (0 when unset)."""
    return deepspeed_zero_stage(cfg.deepspeed)


def unpartitioned(cfg: JobConfig, world_size: int) -> bool:
    """ZeRO-1/2 asked for, DeepSpeed's stage-0 path run: one process has nothing to partition."""
    return job_partitions_nothing(cfg, zero_stage(cfg), world_size, offload_device(cfg.deepspeed) != "none")


def moetrain_clips(ds_config: dict[str, Any]) -> bool:
    """ZeRO-0 in fp32: DeepSpeed neither reports the gradient norm nor counts experts once under EP,
    so moetrain computes the norm and clips itself. ZeRO-1/2 and bf16 use DeepSpeed's optimizer."""
    mixed = ds_config.get("bf16", {}).get("enabled")
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and not mixed


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # ZeRO-3 calls torch's deprecated names for these two collectives on every gather and reduce; torch
    # warns again after each change of the warning filters (checkpointing makes some), flooding the log
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning
    )


def initialize_engine(
    model: nn.Module, optimizer, lr_scheduler, ds_config: dict[str, Any], world_size: int, ep_group=None
):
    """``deepspeed.initialize``. A single process at ZeRO-0 (fp32 or bf16) gets no gradient all-reduce:
    with nothing to reduce, DeepSpeed would still flatten every non-expert gradient into one buffer and
    copy it back each step (2.8 ms of a 90 ms bf16 step of the end-to-end LM; docs/benchmarks.md). ZeRO-1/2
    keep it: their gradient reduction and partitioning run inside it. bf16 at ZeRO-0 steps in moetrain's
    grouped step (``unfused_bf16``), which under expert parallelism sums the experts' norms over
    ``ep_group``."""
    import deepspeed

    quiet_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    undo_unfused_init_step(engine.optimizer)
    stage = deepspeed_zero_stage(ds_config)
    if world_size == 1 and stage == 0:
        engine.enable_backward_allreduce = False
    grouped = use_grouped_step(engine.optimizer, world_size, engine.enable_backward_allreduce, ep_group)
    if not grouped and getattr(getattr(engine.optimizer, "overflow_checker", None), "has_moe_params", False):
        # DeepSpeed's own FP16_UnfusedOptimizer.step would leave the expert gradients out of the norm
        raise RuntimeError("bf16 at ZeRO-0 under expert parallelism needs moetrain's grouped step (unfused_bf16)")
    if stage == 3:
        from moetrain.training import zero3

        zero3.gather_before_backward_of_dataclass_outputs(model)
        zero3.keep_gathered_through_recompute(model)
    return engine
