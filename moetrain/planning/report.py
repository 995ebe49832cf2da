"""What ``moetrain plan`` prints: the job's own layout itemised, then the layouts that fit, best first."""

from __future__ import annotations

from moetrain.config.job import JobConfig
from moetrain.planning.estimate import Assumptions, Estimate, Layout, estimate, runs_as_stage0
from moetrain.planning.model_size import ModelSize
from moetrain.planning.search import Machine, SearchResult, fits, search
from moetrain.planning.states import ZeroSettings
from moetrain.planning.units import gib


def job_layout(cfg: JobConfig, machine: Machine) -> Layout:
    """The layout the config asks for, on ``machine``."""
    zero = ZeroSettings.from_block(cfg.deepspeed)
    return Layout(
        world=machine.world,
        procs_per_node=machine.gpus_per_node,
        ep=cfg.ep_size,
        zero=zero.stage,
        recompute=cfg.train.activation_checkpointing,
        offload=zero.offload_optimizer,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum_steps,
        moe=cfg.moe is not None,
    )


ZERO3_NOTE = (
    "ZeRO-3: an estimate not yet compared with a measured step (ZeRO 0-2 are, docs/benchmarks.md); "
    "leave room for stage 3's persistent parameters and prefetch"
)

ONE_PROCESS_NOTE = (
    "ZeRO-{stage} on one process partitions nothing: estimated as the stage-0 path the trainer runs there "
    "(train.zero_on_one_process=true keeps ZeRO)"
)


def describe(lay: Layout) -> str:
    ac = {"none": "no recompute", "moe": "recompute MoE", "block": "recompute blocks"}[lay.recompute]
    off = ", offload" if lay.offload else ""
    ep = f"EP {lay.ep} x expert-DP {lay.expert_dp}, " if lay.moe else f"data-parallel {lay.world}, "
    return f"{ep}ZeRO-{lay.zero}{off}, {ac}, micro-batch {lay.micro_batch} x {lay.grad_accum}"


def breakdown(est: Estimate) -> list[str]:
    lines = [f"  {t.name:<40} {gib(t.bytes):>12}   {t.why}".rstrip() for t in est.terms]
    moments = ", ".join(f"{k} {gib(v)}" for k, v in est.moments.items())
    lines.append(f"  {'peak of a step':<40} {gib(max(est.moments.values())):>12}   max of {moments}")
    lines.append(f"  {'total per GPU':<40} {gib(est.total):>12}")
    if est.host:
        lines.append(f"  {'host memory per GPU (offloaded state)':<40} {gib(est.host):>12}")
    return lines


def plan_lines(
    cfg: JobConfig,
    size: ModelSize,
    machine: Machine,
    assume: Assumptions,
    top: int = 10,
) -> tuple[list[str], bool]:
    """The report, and whether the job's own layout fits."""
    mem = gib(machine.memory) if machine.memory else "unknown memory"
    lines = [
        f"model: {size.total:,} parameters ({size.shared:,} shared, {size.expert:,} in experts; "
        f"{size.shared + size.active_expert:,} active per token)",
        f"machine: {machine.nodes} node(s) x {machine.gpus_per_node} GPU(s) = world size {machine.world}, {mem} each",
        f"assumed: the busiest EP rank receives {assume.imbalance:g}x the mean expert rows (--imbalance; "
        f"capped by moe.capacity_factor), fixed overhead {gib(assume.overhead)} per GPU (--overhead)",
    ]
    own = estimate(cfg, size, job_layout(cfg, machine), assume)
    own_fits = own.runnable and fits(own, machine)
    verdict = "fits" if own_fits else ("does NOT fit" if own.runnable else f"cannot run: {own.why_not}")
    lines += ["", f"this job's layout: {describe(own.layout)} -- {verdict}", *breakdown(own)]
    if own.layout.zero == 3:
        lines.append(f"  {ZERO3_NOTE}")
    if runs_as_stage0(cfg, own.layout):
        lines.append(f"  {ONE_PROCESS_NOTE.format(stage=own.layout.zero)}")
    result = search(cfg, size, machine, assume)
    lines += ["", *_table(result, machine, top)]
    if result.fitting:
        best = result.fitting[0]
        overrides = " ".join(best.layout.overrides(own.layout.offload))
        lines += ["", f"recommended: {describe(best.layout)}", f"  overrides: {overrides}"]
    else:
        lines += ["", "no layout moetrain can run fits: more GPUs, a shorter data.seq_len or a smaller model"]
    return lines, own_fits


def _table(result: SearchResult, machine: Machine, top: int) -> list[str]:
    shown = result.fitting[:top]
    head = f"layouts that fit ({len(result.fitting)} of {len(result.estimates)} estimated), best first (moetrain/planning/search.py):"
    if machine.memory is None:
        head = f"layouts ({len(result.fitting)} runnable), best first (no --gpu-memory: none ruled out):"
    rows = [
        head,
        f"  {'EP':>3} {'ZeRO':>4} {'offload':>7} {'recompute':>9} {'micro x acc':>11} {'per GPU':>12} {'host':>11}",
    ]
    for est in shown:
        lay = est.layout
        rows.append(
            f"  {lay.ep:>3} {lay.zero:>4} {'cpu' if lay.offload else '-':>7} {lay.recompute:>9} "
            f"{f'{lay.micro_batch} x {lay.grad_accum}':>11} {gib(est.total):>12} {gib(est.host) if est.host else '-':>11}"
        )
    if any(est.layout.zero == 3 for est in shown):
        rows.append(f"  {ZERO3_NOTE}")
    if result.not_runnable_fitting:
        best = result.not_runnable_fitting[0]
        rows.append(f"  also fitting but not runnable: {describe(best.layout)} at {gib(best.total)} ({best.why_not})")
    return rows


def validate_lines(cfg: JobConfig, size: ModelSize, machine: Machine, assume: Assumptions) -> list[str]:
    """``moetrain validate``'s memory lines: the job's layout's total, and a warning when it does not fit."""
    est = estimate(cfg, size, job_layout(cfg, machine), assume)
    parts = ", ".join(f"{t.name} {gib(t.bytes)}" for t in est.terms if not t.name.startswith("activations"))
    lines = [
        f"memory per GPU (moetrain plan): {gib(est.total)} = activations {gib(est.activations_kept)} + {parts}; "
        f"peak at {est.peak_moment}"
    ]
    if machine.memory is not None and est.total > machine.memory:
        lines.append(
            f"warning: {gib(est.total)} per GPU exceeds the device memory ({gib(machine.memory)}); run "
            f"`moetrain plan CONFIG --gpus {machine.gpus_per_node} --nodes {machine.nodes} "
            f"--gpu-memory {machine.memory / 2**30:g}GB` for layouts that fit"
        )
    return lines
