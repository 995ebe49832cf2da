"""Rows that hold several samples kept apart (``segments_BS``: which sample each position holds, contiguous
and non-decreasing along a row): positions that restart at every sample, and block-diagonal causal
attention (shapes: ``backbone/__init__.py``).

The attention path: a boolean mask [B, 1, S, S] (a query sees the keys of its own sample up to itself) given
to ``F.scaled_dot_product_attention``, on every device. Measured on the CPU (torch 2.13, a loaded 2-core
Intel Xeon, fp32, forward + backward, ``bench/packed_attention.py``, docs/benchmarks.md): 1.0-1.13x the
unmasked causal kernel at the tiny LM's shape (B 16, 4 heads, S 128, head dim 32), 1.36-1.46x at S 1024
(B 4, 8 heads, head dim 64), and 1.07-1.08x a whole training step of the tiny LMs. FlexAttention has no
backward on the CPU in torch 2.13, and its compiled forward was slower than the mask there;
``torch.nn.attention.varlen`` is CUDA's flash kernel.

On a GPU the same mask is correct (it is what the tests check) but it keeps SDPA off the flash kernel
(the memory-efficient kernel takes the mask) and the mask costs B * S^2 bytes. The path to build there is
``torch.nn.attention.varlen.varlen_attn`` (flash attention over the packed samples' cumulative lengths,
bf16/fp16, no mask at all) or FlexAttention with a block mask from the segments (skips whole blocks of
other samples); neither is built here, as no GPU was available to check them.
"""

from __future__ import annotations

import torch


def segment_positions(segments_BS: torch.Tensor) -> torch.Tensor:
    """Each position's offset from the start of its sample: 0, 1, ... restarting where the segment changes."""
    S = segments_BS.shape[1]
    index_S = torch.arange(S, device=segments_BS.device)
    starts_BS = torch.ones_like(segments_BS, dtype=torch.bool)
    starts_BS[:, 1:] = segments_BS[:, 1:] != segments_BS[:, :-1]
    first_BS = torch.where(starts_BS, index_S, 0).cummax(dim=1).values  # where the current sample started
    return index_S - first_BS


def block_causal_mask(segments_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i may attend key j: same sample and j <= i."""
    S = segments_BS.shape[1]
    index_S = torch.arange(S, device=segments_BS.device)
    same_BSS = segments_BS[:, :, None] == segments_BS[:, None, :]
    return (same_BSS & (index_S[None, :] <= index_S[:, None]))[:, None]
