"""Model and optimizer state as tensors keyed by global name: what a checkpoint holds, in any layout.

A parameter is keyed by its name in the model; an expert parameter ``w_SLDF`` (local experts on dim 1)
is keyed per *global* expert id, one slice each. Per parameter the checkpoint holds its fp32 value (the
optimizer's master copy under bf16 / fp16), Adam's ``exp_avg`` and ``exp_avg_sq`` and its step count,
so it can be loaded at another world size, expert-parallel size or ZeRO stage:

====================  ====================================  =========================================
DeepSpeed optimizer   when                                  where a parameter's fp32 value and state are
====================  ====================================  =========================================
torch AdamW itself    ZeRO-0, fp32                          the parameter; ``optimizer.state[p]``
FP16_UnfusedOptimizer ZeRO-0, bf16 (any device)             its fp32 copy in ``fp32_groups``
ZeRO-1/2 (any dtype)  ``deepspeed.zero_optimization.stage``  partitioned flat fp32 groups, reached with
BF16_Optimizer        ZeRO-1, bf16, fp32 grad accumulation   DeepSpeed's ``safe_get/set_full_*`` API
ZeRO-3                ``deepspeed.zero_optimization.stage``  partitioned parameters and flat fp32 sub-groups:
                      3                                     ``moetrain/training/zero3.py``
====================  ====================================  =========================================

With ``offload_optimizer`` the ZeRO-1/2 partitions live in host memory and DeepSpeed's CPU Adam steps
them; the same API reaches them (its step count is a Python int, converted on the way in and out).

Reading a partitioned value is a collective over the parameter's data-parallel group, so every rank
walks the parameters in the same order. Anything else (e.g. fp16's fused optimizer) is refused at
setup by :func:`check_supported`, before training starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from moetrain.errors import UserError
from moetrain.training import zero3

MOMENTS = ("exp_avg", "exp_avg_sq")


def _partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping")  # None when all of p lies in other ranks' partitions


def _inner(optimizer) -> torch.optim.Optimizer:
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def _masters(optimizer) -> dict[int, nn.Parameter]:
    """id(model parameter) -> the fp32 parameter the torch optimizer steps, for unpartitioned kinds."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return {id(p): p for g in optimizer.param_groups for p in g["params"]}
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer
        return {
            id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups) for lp, hp in zip(lps, hps)
        }
    return {}


def check_supported(model: nn.Module, optimizer) -> None:
    """Refuse (at setup) a DeepSpeed optimizer whose per-parameter state moetrain cannot checkpoint."""
    if all(zero3.is_partitioned(p) for p in model.parameters()):
        return  # ZeRO-3 owns every parameter (moetrain/training/zero3.py)
    masters = _masters(optimizer)
    if any(_partitioned(p) for p in model.parameters()) and not _lp_groups(optimizer):
        raise RuntimeError(
            f"DeepSpeed's {type(optimizer).__name__} has no bit16_groups / bf16_groups: its internals changed, "
            "and checkpoints could not read its state; install a DeepSpeed version setup.py allows"
        )
    for name, p in model.named_parameters():
        if p.requires_grad and not _partitioned(p) and id(p) not in masters:
            raise UserError(
                f"checkpointing does not support DeepSpeed's {type(optimizer).__name__} (parameter {name}); "
                "use deepspeed.zero_optimization.stage 1 or 2 with this precision"
            )


def _group_step(inner: torch.optim.Optimizer, group: dict) -> torch.Tensor | None:
    for p in group["params"]:
        if "step" in inner.state.get(p, {}):
            step = inner.state[p]["step"]  # DeepSpeed's CPU Adam (offload) counts in a Python int
            return step if torch.is_tensor(step) else torch.tensor(float(step))
    return None


def _lp_groups(optimizer) -> list[list[nn.Parameter]]:
    """The model parameters of each flat group of a partitioning optimizer (ZeRO-1/2, BF16_Optimizer)."""
    return getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None) or []


def _link_states(optimizer) -> None:
    """Point every parameter's fragment mapping at its group's Adam state.

    NOTE: DeepSpeed 0.19.8 links them once, after the first group's first step, when the other
    groups have no state yet: their parameters then report no ``exp_avg``. Linking every group that
    has state fixes that (and links state created by :func:`load_full_state`).
    """
    inner = _inner(optimizer)
    for lps, group in zip(_lp_groups(optimizer), inner.param_groups):
        flat = group["params"][0]
        if inner.state.get(flat):
            lazy_init_hp_params_optimizer_state(lps, flat, inner.state)


def _steps_of_partitioned(optimizer) -> dict[int, torch.Tensor]:
    """id(model parameter) -> the Adam step of its flat ZeRO group (one step per group)."""
    inner, out = _inner(optimizer), {}
    for lps, group in zip(_lp_groups(optimizer), inner.param_groups):
        step = _group_step(inner, group)
        if step is not None:
            out.update({id(p): step for p in lps})
    return out


def full_state(model: nn.Module, optimizer) -> Iterator[tuple[str, nn.Parameter, dict[str, torch.Tensor]]]:
    """For every parameter, in order: (name, parameter, {"value", "exp_avg", "exp_avg_sq", "step"}) as
    full fp32 tensors on this rank's device (state entries missing where Adam has not stepped it yet).

    Collective for partitioned parameters: every rank must consume the whole iterator.
    """
    masters = _masters(optimizer)
    inner = _inner(optimizer)
    _link_states(optimizer)
    part_steps = _steps_of_partitioned(optimizer)
    for name, p in model.named_parameters():
        if zero3.is_partitioned(p):
            entry = zero3.full_entry(optimizer, p)
        elif _partitioned(p):
            entry = {"value": safe_get_full_fp32_param(p)}
            if id(p) in part_steps:
                entry.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
                entry["step"] = part_steps[id(p)]
        else:
            master = masters.get(id(p), p)
            entry = {"value": master.detach().float()}
            entry.update({k: v for k, v in inner.state.get(master, {}).items() if k in (*MOMENTS, "step")})
        yield name, p, entry


@torch.no_grad()
def load_full_state(model: nn.Module, optimizer, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Set every parameter's value and Adam state from ``tensors[name]`` (full local tensors, fp32).

    Local only (no collective): each rank writes the fragments it owns.
    """
    masters = _masters(optimizer)
    inner = _inner(optimizer)
    _create_partitioned_states(model, optimizer, tensors)
    for name, p in model.named_parameters():
        entry = tensors[name]
        if zero3.is_partitioned(p):
            zero3.load_entry(p, entry)
            continue
        value = entry["value"].to(p.device)
        p.copy_(value.to(p.dtype))
        if _partitioned(p):
            safe_set_full_fp32_param(p, value)
            if "exp_avg" in entry:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
            continue
        master = masters.get(id(p), p)
        if master is not p:
            master.copy_(value)
        if "exp_avg" in entry:
            state = inner.state[master]
            state["step"] = _step_tensor(inner, entry["step"], master)
            for k in MOMENTS:
                state[k] = entry[k].to(device=master.device, dtype=master.dtype).clone()


def _step_tensor(inner: torch.optim.Optimizer, step: torch.Tensor, p: torch.Tensor) -> torch.Tensor | int:
    """Adam's step count as the optimizer keeps it: torch's fp32, on the parameter's device for the fused
    (and capturable) kernels, which read it there, wherever it was loaded (``Optimizer.load_state_dict``'s
    rule); DeepSpeed's CPU Adam (optimizer offload) a Python int, which it passes to its C++ kernel."""
    if isinstance(inner, DeepSpeedCPUAdam):
        return int(round(float(step)))
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    return step.clone().to(device=p.device if on_device else step.device, dtype=torch.float32)


def _create_partitioned_states(model: nn.Module, optimizer, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """ZeRO-1/2/3 create Adam's flat state lazily at the first step; create it now (zeros, the saved
    step) and link DeepSpeed's per-parameter views of it, so the full-state setters can write."""
    inner = _inner(optimizer)
    if any(zero3.is_partitioned(p) for p in model.parameters()):
        groups = [(lps, [flat]) for lps, flat in zero3.sub_groups(optimizer)]
    else:
        groups = [(lps, group["params"]) for lps, group in zip(_lp_groups(optimizer), inner.param_groups)]
    if not groups:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    for lps, flats in groups:
        steps = [tensors[names[id(p)]]["step"] for p in lps if id(p) in names and "step" in tensors[names[id(p)]]]
        if not steps:
            continue
        step = max(steps, key=float)
        for flat in flats:
            state = inner.state[flat]
            state["step"] = _step_tensor(inner, step, flat)
            for k in MOMENTS:
                state.setdefault(k, torch.zeros_like(flat))
    _link_states(optimizer)
