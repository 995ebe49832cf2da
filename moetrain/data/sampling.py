"""Sampling: packed blocks of one split, the seeded global order, and this rank's slice of it.

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (B is the micro-batch size).
"""

from __future__ import annotations

import numpy as np
import torch

from moetrain.errors import UserError


class PackedBlocks:
    """Fixed-length blocks of S+1 tokens (input + shifted target) over one split."""

    def __init__(self, tokens, seq_len: int) -> None:
        self.tokens = tokens  # a numpy array or a ShardedTokens: len() and [a:b]
        self.seq_len = seq_len
        self.num_blocks = (len(tokens) - 1) // seq_len

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * S : i * S + S + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TrainStream:
    """The seeded global sample order, and this rank's micro-batches of it."""

    def __init__(self, blocks: PackedBlocks, seed: int, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int):
        if blocks.num_blocks < 1:
            raise UserError("data: the train split holds no complete block; lower data.seq_len")
        self.blocks, self.seed = blocks, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    def _block(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.blocks.num_blocks)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.blocks.num_blocks, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm[pos]

    def sample_indices(self, step: int, micro_step: int) -> list[int]:
        """Global sample indices of this rank's micro-batch ``micro_step`` of optimizer step ``step``."""
        first = (
            step * self.global_batch + micro_step * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        )
        return list(range(first, first + self.micro_batch))

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks.get([self._block(i) for i in self.sample_indices(step, micro_step)])


def val_batches(blocks: PackedBlocks, micro_batch: int, num_batches: int, dp_rank: int, dp_size: int):
    """The fixed held-out micro-batches of this rank (the first blocks of the val split, in order)."""
    for b in range(num_batches):
        first = (b * dp_size + dp_rank) * micro_batch
        idx = [i % blocks.num_blocks for i in range(first, first + micro_batch)]
        yield blocks.get(idx)
