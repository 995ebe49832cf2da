"""The masked loss's normalisation: one mean over the target tokens of the whole global batch.

With a loss mask (chat data, document masking) the micro-batches of a step hold different numbers of
target tokens, on every rank. A mean per micro-batch, averaged over micro-batches and ranks, weighs a
token of a short micro-batch more than one of a long micro-batch, so it changes with the layout (1
process vs EP 2) and is not the mean over the global batch's tokens. So, per optimizer step:

1. each rank counts the target tokens of all its micro-batches of the step (they are read first), and
   one all-reduce (a single number, the step's only extra collective) gives N, the global batch's count;
2. each micro-batch's LM loss is its *summed* cross-entropy divided by ``N / (grad_accum * world)``;
3. DeepSpeed's ``backward`` divides by ``grad_accum`` and its gradient reduction averages over the
   ``world`` data-parallel ranks (expert gradients over their expert-data-parallel group, also divided by
   the world size, ``parallel/deepspeed_moe.py``), so the update follows the gradient of
   (sum of every target token's cross-entropy in the global batch) / N -- what one process computes on
   the whole global batch.

The logged loss is the same quantity: the trainer logs each rank's mean over its micro-batches and the
metrics average over ranks, which gives sum / N again. Evaluation sums the cross-entropy and the counts
over every batch and rank, then divides.

Plain text batches (no mask) keep the model's per-micro-batch mean, bitwise as before.
"""

from __future__ import annotations

import torch

from moetrain.data.sampling import IGNORE, Batch
from moetrain.parallel.collectives import all_reduce_


def target_tokens(batches: list[Batch]) -> torch.Tensor:
    """The target tokens (not IGNORE) of ``batches`` (int64, CPU)."""
    return sum((b.targets_BS != IGNORE).sum() for b in batches)


def global_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` summed over every rank (a float64 copy on ``device``; ``all_reduce_`` reduces it on the
    group's device)."""
    return all_reduce_(values.to(device=device, dtype=torch.float64))


def loss_share(batches: list[Batch], grad_accum: int, world_size: int, device: torch.device) -> torch.Tensor:
    """What each micro-batch's summed cross-entropy is divided by: N / (grad_accum * world_size), N the
    target tokens of the global batch (one all-reduce). At least one token, so a step of no targets
    (which the data never makes: every stored sample has one) cannot divide by zero."""
    total = global_sum(target_tokens(batches), device).clamp(min=1)
    return (total / (grad_accum * world_size)).float()
