"""Parameters, gradients and optimizer state of one rank, as DeepSpeed 0.19 holds them.

Shared parameters are replicated on every rank; a rank holds 1/ep of the experts. Per optimizer
group g with n_g local elements (the groups of ``model_size.optimizer_groups``), partitioned over
its data-parallel group of size dp_g (every rank for shared groups, the expert-data-parallel group
world/ep for expert groups when ep > 1), b bytes per parameter element (4 fp32, 2 bf16):

==========  =================================  ====================================================
ZeRO stage  optimizer DeepSpeed builds         what one rank holds
==========  =================================  ====================================================
0, fp32     torch AdamW                        params b*n, grads b*n, Adam moments 8*n, one fp32
                                               step per parameter tensor
0, bf16     FP16_UnfusedOptimizer              params b*n, grads b*n, fp32 copies 4*n, moments
            (any device: DeepSpeed 0.19.8      8*n, one fp32 step per tensor; during the step the
            picks it for bf16 at stage 0)      fp32 copies' gradients 4*n
1 and 2     DeepSpeedZeroOptimizer             params b*flat, fp32 master + moments 12*flat/dp,
                                               grads: every parameter whose slice of the flat
                                               group overlaps this rank's partition, whole
==========  =================================  ====================================================

``flat`` is the group flattened as ZeRO does it: each parameter but the last padded to 16 bytes,
the whole padded to a multiple of 2*dp elements. With ``offload_optimizer`` (ZeRO-1/2) the fp32
master, the moments and the fp32 gradients of the partition live in host memory, beside a bit16 copy
of the partition, and the GPU keeps no gradient past backward.

ZeRO-3: parameters, gradients and optimizer state all partitioned, plus the parameters gathered for
the layer being computed (DeepSpeed's default prefetch bucket, 5e7 elements, and the largest
parameter). Unlike ZeRO 0-2 this term is not yet compared with a measured step (bench/plan_memory.py
has no ZeRO-3 configuration); the planner says so beside a ZeRO-3 layout.

Transient, per step: ZeRO-1/2 allocate ``reduce_bucket_size`` elements for the gradient reduction
during backward (twice with ``overlap_comm``), ZeRO-1 holds every gradient in full at the end of
backward before it partitions them, ZeRO-0 on several ranks flattens the gradients of each
all-reduce bucket. The ZeRO-1/2 step (``DeepSpeedZeroOptimizer.step``, no offload) first takes the norm
of each gradient piece in its partition from a float64 copy of that piece (8 bytes per element of the
largest piece, one piece at a time), then, one group at a time, flattens the group's partition of
gradients (b bytes per element) and converts that to fp32 (4 more, unless b is 4 and the conversion is
the flat tensor itself); the larger of the two is the step's transient (bench/plan_memory.py's
``*-step`` configurations, where the step is the peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moetrain.planning.model_size import GroupSize

F32 = 4
F64 = 8  # ZeRO-1/2's gradient norm copies each gradient piece to float64 (DeepSpeed 0.19.8)
ADAM_MOMENTS = 2 * F32  # exp_avg + exp_avg_sq, fp32
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / allgather_bucket_size
ALLREDUCE_BUCKET = 500_000_000  # the engine's bucket for ZeRO-0 gradient all-reduce (MEMORY_OPT_ALLREDUCE_SIZE)
PREFETCH_BUCKET = 50_000_000  # ZeRO-3's stage3_prefetch_bucket_size default


@dataclass(frozen=True)
class ZeroSettings:
    """What the ``deepspeed:`` block sets for memory (DeepSpeed's defaults otherwise)."""

    stage: int = 0
    offload_optimizer: bool = False
    reduce_bucket_size: int = DEFAULT_BUCKET
    overlap_comm: bool = False

    @classmethod
    def from_block(cls, block: dict, stage: int | None = None, offload: bool | None = None) -> "ZeroSettings":
        zero = block.get("zero_optimization", {}) or {}
        stage = zero.get("stage", 0) if stage is None else stage
        device = (zero.get("offload_optimizer") or {}).get("device", "none")
        offload = device not in (None, "none") if offload is None else offload
        overlap = zero.get("overlap_comm")
        return cls(
            stage=stage,
            offload_optimizer=offload,
            reduce_bucket_size=int(zero.get("reduce_bucket_size", DEFAULT_BUCKET)),
            overlap_comm=bool(overlap) if overlap is not None else stage == 3,
        )


@dataclass(frozen=True)
class StateBytes:
    """Bytes on one rank's device (and its host, for offloaded state)."""

    parameters: int
    gradients: int  # held at the end of backward, before the optimizer step
    optimizer: int  # fp32 master weights + Adam moments + step counters (device)
    host_optimizer: int  # with offload_optimizer, in host memory: fp32 master + moments
    reduce_buckets: int  # ZeRO-1/2's gradient reduction buffers, during backward
    backward_end: int  # what the end of backward holds on top of parameters + optimizer
    step_transient: int  # what the optimizer step adds on top of parameters + gradients + optimizer
    flat_parameters: int  # bit16 elements per rank after ZeRO's padding (for messages)
    host_gradients: int = 0  # with offload_optimizer: the fp32 gradients of the partition (host)
    host_buffers: int = 0  # with offload_optimizer: a bit16 copy of the partition (host)

    @property
    def host(self) -> int:
        return self.host_optimizer + self.host_gradients + self.host_buffers


def _flat_numel(numels: tuple[int, ...], dp: int, elem: int) -> tuple[int, list[int]]:
    """ZeRO's flat group: each parameter but the last padded to 16 bytes, the whole to 2*dp elements.
    Returns (flat numel, offset of each parameter)."""
    align = 16 // math.gcd(16, elem)
    offsets, cur = [], 0
    for i, n in enumerate(numels):
        offsets.append(cur)
        cur += n
        if i < len(numels) - 1:
            cur += (-cur) % align
    unit = 2 * dp
    return math.ceil(cur / unit) * unit, offsets


def _overlaps(numels: tuple[int, ...], offsets: list[int], flat: int, dp: int, rank: int | None):
    """Per rank of the group (``rank``, its index in the group, or every one for None): the (parameter
    elements, elements inside the partition) of each parameter that overlaps that rank's partition."""
    part = flat // dp
    for r in range(dp) if rank is None else (rank,):
        lo, hi = r * part, (r + 1) * part
        yield [(n, min(o + n, hi) - max(o, lo)) for n, o in zip(numels, offsets) if o < hi and o + n > lo]


def _partition_grads(numels: tuple[int, ...], offsets: list[int], flat: int, dp: int, rank: int | None) -> int:
    """Elements of the gradients a rank keeps: every parameter overlapping its partition, whole; for
    ``rank``, or the largest over the dp ranks (the one that runs out first)."""
    return max(sum(n for n, _ in pieces) for pieces in _overlaps(numels, offsets, flat, dp, rank))


def _largest_piece(numels: tuple[int, ...], offsets: list[int], flat: int, dp: int, rank: int | None) -> int:
    """Elements of the largest part of one parameter inside a rank's partition (``rank`` as above):
    ZeRO-1/2 take the gradient norm of each such part separately."""
    return max(
        max((inside for _, inside in pieces), default=0) for pieces in _overlaps(numels, offsets, flat, dp, rank)
    )


def _dp(group: GroupSize, world: int, ep: int) -> int:
    """The data-parallel size a group is partitioned over: expert groups over world/ep under EP."""
    return world // ep if (group.expert and ep > 1) else world


def state_bytes(
    groups: tuple[GroupSize, ...],
    world: int,
    ep: int,
    precision: str,
    zero: ZeroSettings,
    rank: int | None = None,
) -> StateBytes:
    """``rank``: the global rank whose ZeRO partition of the gradients to count (None: the largest)."""
    """Per-rank parameter, gradient and optimizer bytes (formulas in the module docstring)."""
    b = F32 if precision == "fp32" else 2
    local = [(g, tuple(n // ep for n in g.numels) if g.expert else g.numels) for g in groups]
    n_local = sum(sum(ns) for _, ns in local)
    n_shared = sum(sum(ns) for g, ns in local if not g.expert)
    if zero.stage == 0 and b == F32:  # torch AdamW on the parameters themselves
        tensors = sum(len(ns) for _, ns in local)
        flatten = n_shared * b if world > 1 else 0  # the all-reduce bucket's flat copy (shared grads)
        if world > 1 and ep > 1:
            flatten = max(flatten, (n_local - n_shared) * b)
        return StateBytes(
            parameters=n_local * b,
            gradients=n_local * b,
            optimizer=n_local * ADAM_MOMENTS + tensors * F32,
            host_optimizer=0,
            reduce_buckets=0,
            backward_end=n_local * b + min(flatten, ALLREDUCE_BUCKET * b),
            step_transient=0,
            flat_parameters=n_local,
        )
    if zero.stage == 0:  # bf16: FP16_UnfusedOptimizer, fp32 copies, unpartitioned
        tensors = sum(len(ns) for _, ns in local)
        return StateBytes(
            parameters=n_local * b,
            gradients=n_local * b,
            optimizer=n_local * (F32 + ADAM_MOMENTS) + tensors * F32,
            host_optimizer=0,
            reduce_buckets=0,
            backward_end=n_local * b,
            step_transient=n_local * F32,  # the fp32 copies' gradients
            flat_parameters=n_local,
        )
    params = master = grads = full_grads = biggest_part = largest_piece = 0
    steps = 0
    for g, numels in local:
        dp = _dp(g, world, ep)
        flat, offsets = _flat_numel(numels, dp, b)
        params += flat * b
        master += flat // dp
        biggest_part = max(biggest_part, flat // dp)
        full_grads += sum(numels)
        group_rank = None if rank is None else (rank // ep if (g.expert and ep > 1) else rank)
        grads += _partition_grads(numels, offsets, flat, dp, group_rank)
        largest_piece = max(largest_piece, _largest_piece(numels, offsets, flat, dp, group_rank))
        steps += 1
    optimizer = master * (F32 + ADAM_MOMENTS) + steps * F32
    if zero.stage == 3:  # not yet compared with a measured step: the parameters partitioned too, plus
        # the parameters gathered for the layer being computed (DeepSpeed's prefetch bucket + the largest one)
        largest = max(n for _, numels in local for n in numels)
        gathered = (PREFETCH_BUCKET + largest) * b
        part_params = sum(_flat_numel(ns, _dp(g, world, ep), b)[0] // _dp(g, world, ep) for g, ns in local) * b
        buckets = zero.reduce_bucket_size * b * (2 if zero.overlap_comm else 1)
        return StateBytes(
            part_params + gathered, grads * b, optimizer, 0, buckets, grads * b, biggest_part * F32, params // b
        )
    buckets = zero.reduce_bucket_size * b * (2 if zero.overlap_comm else 1)
    backward_end = full_grads * b if zero.stage == 1 else grads * b
    if zero.offload_optimizer:
        # master, moments, the fp32 gradients and a bit16 copy of the partition live in host memory; the
        # GPU keeps no gradient past backward (ZeRO-2 copies each reduced bucket out; ZeRO-1 at its end)
        return StateBytes(
            params, 0, 0, optimizer, buckets, backward_end, 0, params // b,
            host_gradients=master * F32, host_buffers=master * b,
        )  # fmt: skip
    # the step: first the norm of each gradient piece, each copied to float64 in turn; then, one group at a
    # time, its partition of gradients flattened (bit16) and converted to fp32 (a second copy unless fp32)
    norm_copy = largest_piece * F64
    to_fp32 = biggest_part * (F32 + (b if b != F32 else 0))
    return StateBytes(params, grads * b, optimizer, 0, buckets, backward_end, max(norm_copy, to_fp32), params // b)
