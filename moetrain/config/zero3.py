"""What ZeRO-3 (``deepspeed.zero_optimization.stage: 3``) runs with in moetrain, checked with the config.

ZeRO-3 runs through DeepSpeed's own stage 3, expert parameters partitioned over the expert-data-parallel
group (docs/parallelism.md, "ZeRO-3"). Each combination below is refused here, before anything starts,
with the field, its value and the fix, instead of failing (or hanging) inside DeepSpeed. Pure
validation: this module imports nothing that runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moetrain.config.job import JobConfig

# deepspeed.zero_optimization.<key> -> (is the value one moetrain refuses, why)
REFUSED_ZERO_KEYS: dict[str, tuple[Any, str]] = {
    "offload_param": (
        lambda v: bool(v) and (not isinstance(v, dict) or v.get("device", "none") != "none"),
        "parameters offloaded to the CPU or NVMe are not tested with moetrain's expert partitions and checkpoints",
    ),
    "offload_optimizer": (
        lambda v: bool(v) and (not isinstance(v, dict) or v.get("device", "none") != "none"),
        "ZeRO-3's optimizer offload is not tested with moetrain's expert partitions and checkpoints",
    ),
    "zero_hpz_partition_size": (
        lambda v: v not in (None, 1),
        "hpZeRO's secondary partitions span groups of ranks that ignore the expert-data-parallel groups",
    ),
    "mics_shard_size": (
        lambda v: v not in (None, -1, 0),
        "MiCS shards every parameter over its own groups, not the experts over the expert-data-parallel group",
    ),
    "zero_quantized_weights": (bool, "quantized weight gathers are not tested with expert partitions"),
    "zero_quantized_nontrainable_weights": (bool, "quantized weight gathers are not tested with expert partitions"),
    "zero_quantized_gradients": (bool, "DeepSpeed's stage 3 does not support quantized gradients with experts"),
    "leaf_module": (
        bool,
        "a leaf module's parameters are gathered for the whole module, which moetrain's routers and experts are "
        "not written for",
    ),
    "stage3_module_granularity_threshold": (
        lambda v: bool(v),
        "it makes DeepSpeed treat small modules as leaf modules, which moetrain's routers and experts are not "
        "written for",
    ),
}


def check_zero3(cfg: "JobConfig") -> None:
    """Refuse (ValueError) what ZeRO-3 cannot run with moetrain, one message each."""
    where = "with deepspeed.zero_optimization.stage 3"
    if cfg.moe is not None and cfg.moe.ep_overlap:
        raise ValueError(
            f"moe.ep_overlap (true) does not run {where}: the overlapped exchange computes the experts on detached "
            "copies of their weights, which stage 3 has released between its gathers; set moe.ep_overlap=false, "
            "or use deepspeed.zero_optimization.stage 0, 1 or 2"
        )
    if cfg.train.compile:
        raise ValueError(
            f"train.compile (true) is not supported {where}: stage 3 gathers and releases each module's "
            "parameters from hooks that the compiled blocks would trace through, untested in moetrain; set "
            "train.compile=false, or use deepspeed.zero_optimization.stage 0, 1 or 2"
        )
    zero = cfg.deepspeed.get("zero_optimization", {})
    for key, (refused, why) in REFUSED_ZERO_KEYS.items():
        if key in zero and refused(zero[key]):
            raise ValueError(
                f"deepspeed.zero_optimization.{key} ({zero[key]!r}) is not supported {where}: {why}; remove "
                f"deepspeed.zero_optimization.{key}, or use deepspeed.zero_optimization.stage 0, 1 or 2"
            )
