"""The global gradient norm under expert parallelism, counting every parameter once, and clipping."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moetrain.moe.experts import is_expert_param
from moetrain.parallel.collectives import all_reduce_


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ep_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global gradient norm counting every parameter once, then clip (max_norm 0: measure only).

    norm^2 = |shared grads|^2 + sum over the EP group of |local expert grads|^2. Shared gradients are
    identical on every rank after the data-parallel reduction; expert gradients of one EP rank are
    identical across its expert-data-parallel replicas, so summing over the EP group counts each
    global expert exactly once.

    The norms are multi-tensor kernels in fp32 (``torch._foreach_norm``, also for bf16 gradients); the
    clipping is torch's own (``torch.nn.utils.clip_grads_with_norm_``) with this norm.
    """
    shared, expert, params = [], [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (expert if is_expert_param(name) else shared).append(p.grad)
            params.append(p)
    norm = global_norm(shared, expert, ep_group, next(model.parameters()).device)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@torch.no_grad()
def global_norm(
    shared: list[torch.Tensor],
    expert: list[torch.Tensor],
    ep_group: dist.ProcessGroup | None,
    device: torch.device,
    accumulate: torch.dtype = torch.float32,
) -> torch.Tensor:
    """sqrt(|shared|^2 + sum over ``ep_group`` of |expert|^2) of gradient lists, each tensor's norm in fp32,
    their squares summed in ``accumulate``; a 0-d tensor on ``device``. Collective over ``ep_group`` (also
    used by the bf16 ZeRO-0 optimizer step, ``moetrain/training/unfused_bf16.py``)."""

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device, dtype=accumulate)
        return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).to(accumulate).pow(2).sum()

    expert_sq = sq(expert)
    if ep_group is not None:
        all_reduce_(expert_sq, group=ep_group)
    return (sq(shared) + expert_sq).sqrt()
