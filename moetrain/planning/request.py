"""``moetrain plan``'s flags, checked before anything heavy is imported (no torch here).

Every bad value is one UserError naming the flag, the value and the fix (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetrain.config.job import JobConfig
from moetrain.errors import UserError
from moetrain.planning.units import parse_size


@dataclass(frozen=True)
class Machine:
    nodes: int
    gpus_per_node: int
    memory: int | None  # bytes of one device; None: unknown (nothing is ruled out)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class PlanRequest:
    """``moetrain plan``'s flags, checked (:func:`check_request`)."""

    machine: Machine
    imbalance: float
    overhead: int
    top: int


def check_request(
    cfg: JobConfig, gpus: int, nodes: int, gpu_memory: str, imbalance: float, overhead: str, top: int
) -> PlanRequest:
    """Every flag, and the job's own layout against the world size: one UserError each, before anything
    is imported or built."""
    if gpus < 1:
        raise UserError(f"--gpus ({gpus}) must be >= 1 (GPUs per node)")
    if nodes < 1:
        raise UserError(f"--nodes ({nodes}) must be >= 1")
    if imbalance < 1:
        raise UserError(f"--imbalance ({imbalance}) must be >= 1 (the busiest rank's rows over the mean; 1 = even)")
    if top < 1:
        raise UserError(f"--top ({top}) must be >= 1")
    memory = parse_size(gpu_memory, "--gpu-memory")
    over = parse_size(overhead, "--overhead") if overhead.strip() not in ("0", "0GB") else 0
    cfg.check_world_size(gpus * nodes)  # the job's own layout must be one the world size can form
    return PlanRequest(Machine(nodes, gpus, memory), imbalance, over, top)
