"""``moetrain plan`` and ``moetrain validate``'s memory lines, from a loaded config and plain values.

The flags are checked first, without torch (``request.py``); here the model is built on the meta device.
"""

from __future__ import annotations

from moetrain.config.job import JobConfig
from moetrain.planning.estimate import GPU_OVERHEAD, Assumptions
from moetrain.planning.model_size import model_size
from moetrain.planning.report import plan_lines, validate_lines
from moetrain.planning.request import PlanRequest
from moetrain.planning.search import Machine
from moetrain.planning.units import parse_size


def _check_vocab(cfg: JobConfig) -> None:
    if cfg.model.vocab_size is None:  # the CLI resolves it (moetrain.data.vocab) before planning
        raise ValueError("plan: model.vocab_size must be resolved first")


def plan(cfg: JobConfig, request: PlanRequest, offload_problem: str | None) -> list[str]:
    """The report (``cfg.model.vocab_size`` resolved)."""
    _check_vocab(cfg)
    assume = Assumptions(
        imbalance=request.imbalance, overhead=request.overhead, offload_buildable=offload_problem is None
    )
    lines, _ = plan_lines(cfg, model_size(cfg.model, cfg.moe), request.machine, assume, request.top)
    if offload_problem is not None:
        lines.append(f"note: no offload layout is runnable here: {offload_problem}")
    return lines


def memory_lines(cfg: JobConfig, world: int, gpu_memory: str | None) -> list[str]:
    """The planner's total for the job's layout on ``world`` ranks (one node), warning when it exceeds
    ``gpu_memory`` or, without it, the memory of this machine's first GPU."""
    import torch

    memory = parse_size(gpu_memory, "--gpu-memory") if gpu_memory else None
    if memory is None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    _check_vocab(cfg)
    overhead = GPU_OVERHEAD if memory is not None or torch.cuda.is_available() else 0
    assume = Assumptions(overhead=overhead)
    return validate_lines(cfg, model_size(cfg.model, cfg.moe), Machine(1, world, memory), assume)
