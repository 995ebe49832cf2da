"""One layout's per-rank memory: the named terms and the peak of a training step.

The peak of a step is the largest of three moments (``states.py`` and ``activations.py`` hold the terms):

    A  backward starts:  parameters + optimizer + activations kept + backward's working set
                         + reduction buckets (ZeRO-1/2) + gradients kept between micro-batches (accumulation)
    B  backward ends:    parameters + optimizer + the gradients as backward leaves them
                         (ZeRO-0/1: every gradient whole; ZeRO-2: this rank's partition)
                         + ZeRO-0's flattened all-reduce bucket
    C  optimizer step:   parameters + optimizer + gradients + one group's fp32 gradients

    total = max(A, B, C) + overhead (the CUDA context, NCCL and the allocator's slack; 0 on the CPU)

On the CPU (``device=cpu``) GELU / SwiGLU experts write their weight gradients into buffers the layer
keeps across steps (``moe/grouped_cpu.py``): one per stacked weight, this rank's experts, in the
parameters' dtype. Under ZeRO-1/2 DeepSpeed copies the gradients out, so the buffers are extra at every
moment; under ZeRO-0 a buffer is the ``.grad`` itself from backward to the step, so extra only at A.

Whether the layout can run at all is decided in one place, :data:`RUNNABLE_ZERO_STAGES`. ZeRO-1/2 on one
process are estimated as the stage-0 path the trainer runs there (``partitions_nothing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moetrain.config.deepspeed import SUPPORTED_ZERO_STAGES, job_partitions_nothing
from moetrain.config.job import JobConfig
from moetrain.planning.activations import Shapes, activation_terms
from moetrain.planning.model_size import ModelSize
from moetrain.planning.states import StateBytes, ZeroSettings, state_bytes

GiB = 1024**3
GPU_OVERHEAD = 2 * GiB  # CUDA context (~0.5-1 GiB), NCCL communicators, cuBLAS workspaces, fragmentation


@dataclass(frozen=True)
class Layout:
    """One way to run the job: where the experts and the optimizer state live, what is recomputed."""

    world: int
    procs_per_node: int
    ep: int
    zero: int
    recompute: str  # train.activation_checkpointing
    offload: bool
    micro_batch: int
    grad_accum: int
    moe: bool = True  # a dense model (moe: null) has no expert-parallel size to set

    @property
    def expert_dp(self) -> int:
        return self.world // self.ep

    def overrides(self, offloading_now: bool = False) -> list[str]:
        """The config overrides that select this layout (``offloading_now``: the config offloads, so a
        layout without offload must say so)."""
        out = [
            *([f"moe.expert_parallel_size={self.ep}"] if self.moe else []),
            f"deepspeed.zero_optimization.stage={self.zero}",
            f"train.activation_checkpointing={self.recompute}",
            f"train.micro_batch_size={self.micro_batch}",
            f"train.grad_accum_steps={self.grad_accum}",
        ]
        if self.offload or offloading_now:
            out.append(f"deepspeed.zero_optimization.offload_optimizer.device={'cpu' if self.offload else 'none'}")
        return out


@dataclass(frozen=True)
class Assumptions:
    """What the estimate assumes beyond the config; each is printed with the plan."""

    imbalance: float = 2.0  # the busiest EP rank receives this many times the mean rows (capped by capacity)
    device: str = "cuda"
    overhead: int = GPU_OVERHEAD
    layer_rows_factors: tuple[float, ...] | None = None  # measured per MoE layer (bench/plan_memory.py)
    offload_buildable: bool = True  # DeepSpeed's CPU Adam can be built here (moetrain.training.offload)
    rank: int | None = None  # whose gradient partition to count; None: the largest (bench: the measured rank)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    why: str = ""


@dataclass
class Estimate:
    layout: Layout
    terms: list[Term]  # itemised device memory
    moments: dict[str, int]  # A, B, C as in the module docstring
    total: int  # max(moments) + overhead
    host: int  # offloaded optimizer state, fp32 gradients and buffers in host memory, per rank
    states: StateBytes
    activations_kept: int
    working_set: int
    working_set_of: str
    runnable: bool
    why_not: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)


def runs_as_stage0(cfg: JobConfig, layout: Layout) -> bool:
    """ZeRO-1/2 on one process, run as stage 0 (config/deepspeed.py ``partitions_nothing``)."""
    return job_partitions_nothing(cfg, layout.zero, layout.world, layout.offload)


def estimate(cfg: JobConfig, size: ModelSize, layout: Layout, assume: Assumptions) -> Estimate:
    """The per-rank memory of ``cfg``'s model in ``layout`` (``cfg.model.vocab_size`` resolved)."""
    stage = 0 if runs_as_stage0(cfg, layout) else layout.zero  # what the trainer runs (engine.unpartitioned)
    zero = ZeroSettings.from_block(cfg.deepspeed, stage=stage, offload=layout.offload)
    b = 4 if cfg.train.precision == "fp32" else 2
    states = state_bytes(size.groups, layout.world, layout.ep, cfg.train.precision, zero, assume.rank)
    shapes = Shapes(
        tokens=layout.micro_batch * cfg.data.seq_len,
        seq_len=cfg.data.seq_len,
        dtype_bytes=b,
        model=cfg.model,
        moe=cfg.moe,
        ep_size=layout.ep,
        rows_factor=assume.imbalance,
        layer_rows_factors=assume.layer_rows_factors,
        device=assume.device,
    )
    acts = activation_terms(shapes, layout.recompute)
    kept = sum(acts.kept.values())
    persistent = states.parameters + states.optimizer
    between = 0
    if layout.grad_accum > 1:  # gradients stay between the micro-batches of a step
        between = states.backward_end if zero.stage < 2 else states.gradients
    buckets = states.reduce_buckets if zero.stage in (1, 2) else 0
    cpu_buffers = 0
    if assume.device == "cpu" and cfg.moe is not None and cfg.moe.expert_type != "stacked":
        cpu_buffers = size.expert // layout.ep * b
    after_backward = cpu_buffers if zero.stage > 0 else 0
    moments = {
        "A (backward starts)": persistent + cpu_buffers + kept + acts.working_set + buckets + between,
        "B (backward ends)": persistent + after_backward + states.backward_end,
        "C (optimizer step)": persistent + after_backward + states.gradients + states.step_transient,
    }
    overhead = assume.overhead
    terms = [
        Term("parameters", states.parameters, _param_why(size, layout, b, zero.stage)),
        Term("gradients", states.gradients, "held at the end of backward (ZeRO-2: this rank's partition)"),
        Term("optimizer state", states.optimizer, _opt_why(zero, cfg.train.precision)),
        *(Term(f"activations: {k}", v) for k, v in acts.kept.items()),
        Term("backward working set", acts.working_set, acts.working_set_of),
        Term("CPU experts' weight-gradient buffers", cpu_buffers, "kept by the layer across steps (CPU only)"),
        Term("gradient reduction buckets", buckets, "ZeRO-1/2: deepspeed.zero_optimization.reduce_bucket_size"),
        Term("gradients kept between micro-batches", between, f"train.grad_accum_steps={layout.grad_accum}"),
        Term("fixed overhead", overhead, "CUDA context, NCCL, allocator slack" if overhead else ""),
    ]
    runnable, why_not = runnable_layout(layout, assume.offload_buildable)
    return Estimate(
        layout=layout,
        terms=[t for t in terms if t.bytes],
        moments=moments,
        total=max(moments.values()) + overhead,
        host=states.host,
        states=states,
        activations_kept=kept,
        working_set=acts.working_set,
        working_set_of=acts.working_set_of,
        runnable=runnable,
        why_not=why_not,
    )


# The one switch for what moetrain can run (config/deepspeed.py).
RUNNABLE_ZERO_STAGES = SUPPORTED_ZERO_STAGES


def runnable_layout(layout: Layout, offload_buildable: bool = True) -> tuple[bool, str | None]:
    if layout.zero not in RUNNABLE_ZERO_STAGES:
        return False, f"ZeRO-{layout.zero} is not supported by moetrain yet (estimate only)"
    if layout.offload and layout.zero not in (1, 2):
        return False, "optimizer offload needs ZeRO-1 or ZeRO-2"
    if layout.offload and not offload_buildable:
        return False, "DeepSpeed's CPU Adam cannot be built here"
    return True, None


def _param_why(size: ModelSize, layout: Layout, b: int, stage: int) -> str:
    shared, expert = size.shared, size.expert // layout.ep
    pad = " (ZeRO's flat groups, padded)" if stage else ""
    return f"{shared:,} shared + {expert:,} expert (1/{layout.ep} of {size.expert:,}) x {b} B{pad}"


def _opt_why(zero: ZeroSettings, precision: str) -> str:
    if zero.offload_optimizer:
        return "offloaded to host memory"
    if zero.stage == 0 and precision == "fp32":
        return "Adam moments 8 B/param (fp32 weights are the master copy)"
    return "fp32 master + Adam moments, 12 B/param, partitioned over the data-parallel ranks"
