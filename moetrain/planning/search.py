"""The layouts a job could run in, estimated, and the ones that fit, best first.

Candidates keep the job's global batch (micro-batch x accumulation x world size) and vary:
expert-parallel size (every divisor of the experts that divides the world size), ZeRO stage 0-3,
``train.activation_checkpointing`` none / moe / block, optimizer offload (ZeRO-1/2) and the
micro-batch (with the accumulation that keeps the global batch).

Best first means fastest expected, in this order of what costs most: no optimizer offload (the
step's Adam runs on the CPU and every gradient crosses PCIe), the least recomputation (none, then
moe, then block: 0.85x and 0.73x the tokens/s of none on the CPU, docs/parallelism.md), the largest
micro-batch, the lowest ZeRO stage (ZeRO-0/1 all-reduce as plain data parallelism does; ZeRO-2
adds per-bucket reduce-scatters), expert-parallel groups inside a node, the smallest EP size (fewer
all-to-all peers); then the most memory left. ZeRO-3 (its parameters gathered per layer, every step)
is the highest stage in that order. Layouts moetrain cannot run (offload under ZeRO-0 or
ZeRO-3; offload where DeepSpeed's CPU Adam cannot be built) are estimated and listed, never recommended.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moetrain.config.job import JobConfig
from moetrain.planning.estimate import Assumptions, Estimate, Layout, estimate
from moetrain.planning.model_size import ModelSize
from moetrain.planning.request import Machine

RECOMPUTE_COST = {"none": 0, "moe": 1, "block": 2}


def expert_parallel_sizes(cfg: JobConfig, world: int) -> list[int]:
    if cfg.moe is None:
        return [1]
    counts = [cfg.moe.num_experts, *(cfg.moe.num_experts_per_layer or [])]
    return [ep for ep in range(1, world + 1) if world % ep == 0 and all(n % ep == 0 for n in counts)]


def candidates(cfg: JobConfig, machine: Machine) -> list[Layout]:
    world = machine.world
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    recompute = ["none", "moe", "block"] if cfg.moe is not None else ["none", "block"]
    out = []
    for ep in expert_parallel_sizes(cfg, world):
        for zero in (0, 1, 2, 3):
            for offload in (False, True) if zero else (False,):
                for ac in recompute:
                    for micro in range(1, global_batch + 1):
                        if global_batch % micro:
                            continue
                        lay = Layout(world, machine.gpus_per_node, ep, zero, ac, offload, micro, global_batch // micro)
                        out.append(replace(lay, moe=cfg.moe is not None))
    return out


def fits(est: Estimate, machine: Machine) -> bool:
    return machine.memory is None or est.total <= machine.memory


def rank_key(est: Estimate, machine: Machine) -> tuple:
    lay = est.layout
    free = (machine.memory or 0) - est.total
    inside_node = lay.ep <= lay.procs_per_node and lay.procs_per_node % lay.ep == 0
    return (lay.offload, RECOMPUTE_COST[lay.recompute], -lay.micro_batch, lay.zero, not inside_node, lay.ep, -free)


@dataclass
class SearchResult:
    estimates: list[Estimate]  # every candidate
    fitting: list[Estimate]  # runnable and within the device memory, best first
    not_runnable_fitting: list[Estimate]  # would fit, but moetrain cannot run them (e.g. ZeRO-3)


def search(cfg: JobConfig, size: ModelSize, machine: Machine, assume: Assumptions) -> SearchResult:
    ests = [estimate(cfg, size, lay, assume) for lay in candidates(cfg, machine)]
    ok = sorted((e for e in ests if e.runnable and fits(e, machine)), key=lambda e: rank_key(e, machine))
    other = sorted((e for e in ests if not e.runnable and fits(e, machine)), key=lambda e: rank_key(e, machine))
    return SearchResult(ests, ok, other)
