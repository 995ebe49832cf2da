"""ZeRO-3 parameters as moetrain reads and writes them: per-parameter state and the hooks stage 3 needs.

Under ``deepspeed.zero_optimization.stage: 3`` DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3`` owns every
parameter: ``p.data`` is empty between forwards (unless stage 3 keeps the parameter whole, see
``stage3_param_persistence_threshold``), ``p.ds_tensor`` is this rank's partition of it (model dtype)
over ``p.ds_process_group`` -- all ranks for shared parameters, the expert-data-parallel group for
experts (``moetrain/parallel/deepspeed_moe.py``) -- and the fp32 master partition and Adam's moments
live in flat tensors, one per sub-group. :mod:`moetrain.training.state_io` reaches them through the
helpers here:

- :func:`full_entry`: a parameter's fp32 value, moments and step, assembled over its partition group
  with DeepSpeed's ``safe_get_full_*`` API (collective);
- :func:`load_entry`: the same written back into this rank's partitions (local);
- :func:`sub_groups`: each sub-group's parameters and flat fp32 partition (Adam's state key);
- :func:`gather_before_backward_of_dataclass_outputs` and :func:`keep_gathered_through_recompute`: see below.

Stage 3 gathers a module's parameters again for its backward from a hook on the tensors the module
returns, which it finds only in a tensor, tuple, list or dict. moetrain's routers return a frozen
``RoutingDecision`` dataclass (by design: not a tuple), so without help a router's parameters would still be
released when their gradients arrive (a shape error in ``AccumulateGrad``).

``train.activation_checkpointing`` recomputes a region's forward inside backward (non-reentrant
``torch.utils.checkpoint``). When a module of the region has already had its parameters gathered for
its backward before the recompute starts (its output is the region's last op, as a dense block's FFN
output projection is), stage 3's post-forward hook in the recompute releases them again, and that
module's backward then finds them empty. :func:`keep_gathered_through_recompute` keeps those parameters
gathered through the recompute; stage 3 releases them after the module's backward as usual.

NOTE: DeepSpeed's stage-3 getters and setters skip a parameter with ``requires_grad=False`` (they
return None). StableMoE's stage 2 freezes the distilled router that way between steps, and its value
and moments must still be saved and restored, so they are read and written with ``requires_grad``
turned on for the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")


def gather_before_backward_of_dataclass_outputs(model: nn.Module) -> None:
    """Call after ``deepspeed.initialize`` (ZeRO-3): every module with parameters of its own passes the
    differentiable tensors of a dataclass it returns through stage 3's pre-backward function, as stage 3
    does itself for tensors, tuples, lists and dicts, so they are gathered before its backward runs.
    Stage 3's warning that it cannot see into moetrain's dataclasses is dropped: this is the answer to it."""
    from deepspeed.utils import logger

    logger.addFilter(_HandledDataclassWarning())
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        if not hasattr(module, "pre_bwd_fn"):
            raise RuntimeError(
                f"DeepSpeed's ZeRO-3 hooks changed: {type(module).__name__} has no pre_bwd_fn after "
                "deepspeed.initialize; install a DeepSpeed version setup.py allows"
            )
        module.register_forward_hook(_gather_before_backward)


class _HandledDataclassWarning(logging.Filter):
    """Drops stage 3's warning about an output type it cannot look into, for moetrain's own dataclasses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unknown inputs or outputs type (<class 'moetrain." not in record.getMessage()


_HELD_FOR_BACKWARD = -1  # never a module's ds_id: stage 3 releases no parameter whose active set holds it


def keep_gathered_through_recompute(model: nn.Module) -> None:
    """Call after ``deepspeed.initialize`` (ZeRO-3): a forward that runs inside backward (a recompute)
    leaves gathered the parameters that were gathered when it started (for their module's backward).

    Three hooks per module with parameters of its own: before stage 3's pre-forward hook, note which are
    gathered; before its post-forward hook (which releases them), mark them held; after it, restore the
    set of modules stage 3 had them active for."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        held: dict[int, set[int]] = {}

        def note(module, args, params=params, held=held):
            held.clear()
            if torch._C._current_graph_task_id() != -1:  # this forward runs inside backward: a recompute
                held.update({id(p): set(p.ds_active_sub_modules) for p in params if _gathered(p)})

        def hold(module, args, output, params=params, held=held):
            for p in params:
                if id(p) in held:
                    p.ds_active_sub_modules.add(_HELD_FOR_BACKWARD)

        def restore(module, args, output, params=params, held=held):
            for p in params:
                if id(p) in held:
                    p.ds_active_sub_modules.discard(_HELD_FOR_BACKWARD)
                    p.ds_active_sub_modules.update(held[id(p)])
            held.clear()

        module.register_forward_pre_hook(note, prepend=True)
        module.register_forward_hook(hold, prepend=True)
        module.register_forward_hook(restore)


def _gathered(p: nn.Parameter) -> bool:
    """Gathered by stage 3 now, and not kept whole for good (``ds_persist``)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist


def _gather_before_backward(module: nn.Module, inputs, output):
    if not dataclasses.is_dataclass(output) or isinstance(output, type):
        return None  # stage 3's own hook sees tensors, tuples, lists and dicts
    changes = {}
    for f in dataclasses.fields(output):
        value = getattr(output, f.name)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            changes[f.name] = module.pre_bwd_fn.apply(value)
    return dataclasses.replace(output, **changes) if changes else None


def is_partitioned(p: nn.Parameter) -> bool:
    """Whether ZeRO-3 owns ``p`` (``deepspeed.zero.Init`` gives every parameter it converts a ``ds_id``)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def _trainable(p: nn.Parameter) -> Iterator[None]:
    """``p.requires_grad`` on for the call (see the module's NOTE)."""
    was = p.requires_grad
    p.requires_grad_(True)
    try:
        yield
    finally:
        p.requires_grad_(was)


def sub_groups(optimizer) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """(parameters, flat fp32 partition) of each stage-3 sub-group; Adam's state is keyed by the flat tensor."""
    return list(zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat))


def _flat_of(optimizer, p: nn.Parameter) -> torch.Tensor:
    return optimizer.fp32_partitioned_groups_flat[optimizer.grad_position[optimizer.get_param_id(p)][0]]


def full_entry(optimizer, p: nn.Parameter) -> dict[str, torch.Tensor]:
    """{"value", "exp_avg", "exp_avg_sq", "step"} of ``p`` as full fp32 tensors (moments and step only once
    Adam has stepped its sub-group). Collective over ``p``'s partition group."""
    state = optimizer.optimizer.state.get(_flat_of(optimizer, p), {})
    with _trainable(p):
        entry = {"value": safe_get_full_fp32_param(p)}
        if "exp_avg" in state:
            entry.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
            entry["step"] = state["step"]
    return entry


@torch.no_grad()
def load_entry(p: nn.Parameter, entry: dict[str, torch.Tensor]) -> None:
    """Write ``entry`` (full fp32 tensors) into this rank's partitions of ``p``: the fp32 master and
    moments, the model-dtype partition ``ds_tensor``, and the whole tensor where stage 3 keeps it. Local."""
    value = entry["value"].to(p.ds_tensor.device)
    with _trainable(p):
        safe_set_full_fp32_param(p, value)
        if "exp_avg" in entry:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, entry[k].to(value.device), k)
    part = p.ds_tensor
    start = part.numel() * dist.get_rank(group=p.ds_process_group)
    mine = value.flatten()[start : start + part.numel()]  # the last rank's partition is padded
    part.zero_()
    part[: mine.numel()].copy_(mine.to(part.dtype))
    if p.numel() == p.ds_numel:  # kept whole (persistent) or gathered now
        p.data.copy_(value.view(p.ds_shape).to(p.dtype))
