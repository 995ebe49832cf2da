"""Sampling: packed blocks of one split, the seeded global order, and this rank's slice of it.

A mixture (``data.sources``) draws each global sample's source from a ``MixturePlan``: every window of
``MIX_WINDOW`` consecutive samples holds each source's share exactly (largest remainder), in a seeded
order; the n-th sample of a source takes the n-th block of that source's own seeded epochs. Everything is
a pure function of (seed, global sample index), so resuming needs only the step.

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (B is the micro-batch size).
"""

from __future__ import annotations

import numpy as np
import torch

from moetrain.errors import UserError

MIX_WINDOW = 10_000  # samples per mixture window: shares are exact in each, to 1 / MIX_WINDOW


class PackedBlocks:
    """Fixed-length blocks of S+1 tokens (input + shifted target) over one split."""

    def __init__(self, tokens, seq_len: int) -> None:
        self.tokens = tokens  # a numpy array or a ShardedTokens: len() and [a:b]
        self.seq_len = seq_len
        self.num_blocks = (len(tokens) - 1) // seq_len

    def row(self, i: int) -> np.ndarray:
        S = self.seq_len
        return np.asarray(self.tokens[i * S : i * S + S + 1], dtype=np.int64)

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _pair(np.stack([self.row(i) for i in indices]))


def _pair(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class MixturePlan:
    """Which source each global sample comes from, and its index among that source's samples."""

    def __init__(self, weights: list[float], seed: int) -> None:
        total = sum(weights)
        exact = [w / total * MIX_WINDOW for w in weights]
        quota = [int(x) for x in exact]
        for j in sorted(range(len(weights)), key=lambda j: quota[j] - exact[j])[: MIX_WINDOW - sum(quota)]:
            quota[j] += 1  # largest remainder first
        for j, q in enumerate(quota):
            if q == 0:
                raise UserError(
                    f"data.sources[{j}]: weight {weights[j]} is below 1/{MIX_WINDOW} of the total ({total}); "
                    "raise it or remove the source"
                )
        self.quota, self.seed = quota, seed
        self._window, self._order, self._rank = -1, None, None

    def locate(self, sample: int) -> tuple[int, int]:
        """``(source, n)``: global sample ``sample`` is the ``n``-th sample of ``source``."""
        window, pos = divmod(sample, MIX_WINDOW)
        if window != self._window:
            order = np.repeat(np.arange(len(self.quota)), self.quota)
            np.random.default_rng([self.seed, window, 0x6D6978]).shuffle(order)
            rank = np.empty(MIX_WINDOW, dtype=np.int64)
            for j in range(len(self.quota)):
                rank[order == j] = np.arange(self.quota[j])
            self._window, self._order, self._rank = window, order, rank
        source = int(self._order[pos])
        return source, window * self.quota[source] + int(self._rank[pos])


class TrainStream:
    """The seeded global sample order, and this rank's micro-batches of it.

    ``blocks``: the train blocks of one source, or a list of them with ``weights`` (a mixture)."""

    def __init__(
        self,
        blocks: PackedBlocks | list[PackedBlocks],
        seed: int,
        micro_batch: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        weights: list[float] | None = None,
    ):
        self.sources = blocks if isinstance(blocks, list) else [blocks]
        for j, b in enumerate(self.sources):
            if b.num_blocks < 1:
                where = "data" if len(self.sources) == 1 else f"data.sources[{j}]"
                raise UserError(f"{where}: the train split holds no complete block; lower data.seq_len")
        self.plan = MixturePlan(weights, seed) if len(self.sources) > 1 else None
        self.seed = seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._perms: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, its permutation)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    def _block(self, sample: int) -> tuple[int, int]:
        """``(source, block)`` of global sample ``sample``."""
        source, n = self.plan.locate(sample) if self.plan is not None else (0, sample)
        blocks = self.sources[source].num_blocks
        epoch, pos = divmod(n, blocks)
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            # source 0 keeps the one-source order; the others get their own seeds
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + (source << 40))
            cached = self._perms[source] = (epoch, torch.randperm(blocks, generator=gen).tolist())
        return source, cached[1][pos]

    def sample_indices(self, step: int, micro_step: int) -> list[int]:
        """Global sample indices of this rank's micro-batch ``micro_step`` of optimizer step ``step``."""
        first = (
            step * self.global_batch + micro_step * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        )
        return list(range(first, first + self.micro_batch))

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = [self._block(i) for i in self.sample_indices(step, micro_step)]
        return _pair(np.stack([self.sources[s].row(b) for s, b in picks]))


def val_batches(blocks: PackedBlocks, micro_batch: int, num_batches: int, dp_rank: int, dp_size: int):
    """The fixed held-out micro-batches of this rank (the first blocks of the val split, in order)."""
    for b in range(num_batches):
        first = (b * dp_size + dp_rank) * micro_batch
        idx = [i % blocks.num_blocks for i in range(first, first + micro_batch)]
        yield blocks.get(idx)
