"""Auxiliary routing losses, each a pure function of this micro-batch's routing.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

Counts that a loss needs over the whole batch are all-reduced (no gradient) over ``group`` when one
is given: the data-parallel group, i.e. every token of the global micro-batch. The differentiable
part stays local, so averaging the per-rank losses (as gradient averaging does) equals the loss of
one process that sees the whole micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_counts(counts_E: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Per-expert counts summed over ``group`` (a copy; never differentiable)."""
    counts_E = counts_E.detach().clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_E, group=group)
    return counts_E


def switch_load_balance_loss(
    probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Switch / GShard load-balance loss ``E * sum_i f_i * P_i`` (1.0 when perfectly balanced).

    f_i = fraction of the (token, slot) pairs routed to expert i, over the global micro-batch;
    P_i = mean routing probability of expert i over this rank's tokens (carries the gradient).
    """
    num_experts = probs_TE.shape[-1]
    counts_E = global_counts(counts_E, group).float()
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    p_E = probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def sequence_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, top_k: int, group: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, the mean over sequences (groups of ``group`` tokens) of
    ``sum_i f_i * P_i`` with f_i = E / (k * S) * (tokens of the sequence that chose i) and P_i = the mean
    normalised score of expert i over the sequence (carries the gradient). 1.0 when balanced."""
    T, E = probs_TE.shape
    chosen_TE = torch.zeros(T, E, device=probs_TE.device).scatter_(1, expert_ids_TK, 1.0)
    f_NE = chosen_TE.view(T // group, group, E).sum(dim=1) * (E / (top_k * group))
    p_NE = probs_TE.float().view(T // group, group, E).mean(dim=1)
    return (f_NE * p_NE).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
