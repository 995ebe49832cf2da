"""Every collective of training and checkpointing goes through here, on the device its group needs.

NCCL accepts only CUDA tensors; gloo only host tensors for ``all_to_all_single``. A tensor that code
built on the host (``torch.zeros(2)``, a flag made with ``.cpu()``) works under gloo and fails -- or, for
an object collective, silently pays a copy -- under NCCL. So no caller hands a tensor to
``torch.distributed`` directly: each function below moves its tensors to :func:`comm_device` of the group
first (a no-op where they already are) and copies an in-place result back where the caller's tensor
lives. The device follows from the group's backend, never from where the caller happened to build the
tensor: ``cuda:<current device>`` for NCCL, ``cpu`` otherwise.

The model side (routers' counts, metrics) all-reduces tensors that live where the model lives, which is
the communication device by construction; ``tests/test_collective_devices.py`` records every tensor that
reaches ``torch.distributed`` during a training, checkpoint, resume and evaluation cycle, with tensors
built on the host marked, and checks that none arrives from the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# ``MOETRAIN_FORCE_COLLECTIVES=1`` (read by ParallelLayout.init): run every collective even alone, so a
# one-GPU check exercises NCCL's device rules (scripts/gpu_check.py). Set once, before training starts.
_FORCE = False


def force_collectives(on: bool) -> None:
    global _FORCE
    _FORCE = on


def forced() -> bool:
    return _FORCE


def active(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a collective over ``group`` (None: the world) runs: other processes take part (or
    :func:`force_collectives` asks for it alone)."""
    return dist.is_initialized() and (dist.get_world_size(group) > 1 or _FORCE)


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s backend wants tensors: the current CUDA device for NCCL, else the host."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group`` (a no-op alone); returns ``t``."""
    if not active(group):
        return t
    on_comm = t.to(comm_device(group))
    dist.all_reduce(on_comm, op=op, group=group)
    if on_comm is not t:
        t.copy_(on_comm)
    return t


def mean_over_ranks(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The mean of ``values`` over the ranks of ``group`` (a copy)."""
    values = values.clone()
    if active(group):
        all_reduce_(values, group=group)
        values /= dist.get_world_size(group)
    return values


def any_rank(flag: torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` (a 0-dim or 1-element tensor, non-zero = yes) is set on any rank: one all-reduce
    and one host sync."""
    flag = flag.detach().to(torch.int32).reshape(1)
    all_reduce_(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """``dist.barrier()`` when several processes run; a no-op alone. NCCL is told the device, so it does
    not guess one per rank."""
    if not active(group):
        return
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled by torch inside the process group: never from
    disk). torch puts the bytes on the group's device itself (the current CUDA device for NCCL)."""
    if not active(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def gather_objects(obj: Any, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (in rank order; None elsewhere)."""
    if not active(group):
        return [obj]
    rank = dist.get_rank(group)
    out = [None] * dist.get_world_size(group) if rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out
