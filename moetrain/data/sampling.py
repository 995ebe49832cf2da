"""Sampling: packed blocks of one split, the seeded global order, and this rank's slice of it.

A mixture (``data.sources``) draws each global sample's source from a ``MixturePlan``: every window of
``MIX_WINDOW`` consecutive samples holds each source's share exactly (largest remainder), in a seeded
order; the n-th sample of a source takes the n-th block of that source's own seeded epochs. Everything is
a pure function of (seed, global sample index), so resuming needs only the step.

Rows whose samples are kept apart (chat / prompt-completion rows, ``packing.py``; text blocks under
``data.document_masking``) come with their segments: a batch then has targets of -100 where there is no
loss (``IGNORE``) and ``segments_BS``, from which the model restarts positions and builds block-diagonal
causal attention. Plain text batches are exactly what they always were (``segments_BS`` None).

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (B is the micro-batch size).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from moetrain.errors import UserError

MIX_WINDOW = 10_000  # samples per mixture window: shares are exact in each, to 1 / MIX_WINDOW
IGNORE = -100  # a target that counts in no loss (F.cross_entropy's ignore_index)


class Batch(NamedTuple):
    tokens_BS: torch.Tensor
    targets_BS: torch.Tensor  # IGNORE where no loss
    segments_BS: torch.Tensor | None  # which sample of its row each position holds; None: one per row, all targets


class PackedBlocks:
    """Fixed-length blocks of S+1 tokens (input + shifted target) over one split.

    ``eos_id`` (``data.document_masking``): each document, ended by that token, is a segment of its own."""

    def __init__(self, tokens, seq_len: int, eos_id: int | None = None) -> None:
        self.tokens = tokens  # a numpy array or a ShardedTokens: len() and [a:b]
        self.seq_len = seq_len
        self.num_blocks = (len(tokens) - 1) // seq_len
        self.eos_id = eos_id
        self.isolated = eos_id is not None

    def row(self, i: int) -> np.ndarray:
        S = self.seq_len
        return np.asarray(self.tokens[i * S : i * S + S + 1], dtype=np.int64)

    def packed_row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, loss mask (all) and segments: a new one after each end-of-document token."""
        tokens = self.row(i)
        ends = tokens == self.eos_id if self.eos_id is not None else np.zeros(len(tokens), dtype=bool)
        segments = np.concatenate([[0], np.cumsum(ends[:-1])])
        return tokens, np.ones(len(tokens), dtype=bool), segments

    def get(self, indices: list[int]) -> Batch:
        return rows_batch(self, indices)


def rows_batch(blocks, indices: list[int]) -> Batch:
    """The rows ``indices`` of one split (``PackedBlocks`` or ``packing.PackedSamples``) as a batch."""
    if blocks.isolated:
        return _isolated([blocks.packed_row(i) for i in indices])
    return _pair(np.stack([blocks.row(i) for i in indices]))


def _pair(rows: np.ndarray) -> Batch:
    t = torch.from_numpy(rows)
    return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), None)


def _isolated(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    """A batch of rows of kept-apart samples: a target counts where its token is in the loss mask and in the
    same segment as its input (not the first token of the next sample, nor padding after a sample)."""
    tokens_BS1 = np.stack([r[0] for r in rows])
    mask_BS1 = np.stack([r[1] for r in rows])
    segments_BS1 = np.stack([r[2] for r in rows])
    counts = mask_BS1[:, 1:] & (segments_BS1[:, 1:] == segments_BS1[:, :-1])
    targets_BS = np.where(counts, tokens_BS1[:, 1:], IGNORE)
    return Batch(
        torch.from_numpy(tokens_BS1[:, :-1].copy()),
        torch.from_numpy(targets_BS),
        torch.from_numpy(segments_BS1[:, :-1].copy()),
    )


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
        self.isolated = any(b.isolated for b in self.sources)  # every batch then carries segments
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

    def batch(self, step: int, micro_step: int) -> Batch:
        picks = [self._block(i) for i in self.sample_indices(step, micro_step)]
        if self.isolated:  # a plain text row among them: one segment, every target
            return _isolated([self.sources[s].packed_row(b) for s, b in picks])
        return _pair(np.stack([self.sources[s].row(b) for s, b in picks]))


def val_batches(blocks, micro_batch: int, num_batches: int, dp_rank: int, dp_size: int):
    """The fixed held-out micro-batches of this rank (the first blocks of the val split, in order)."""
    for b in range(num_batches):
        first = (b * dp_size + dp_rank) * micro_batch
        idx = [i % blocks.num_blocks for i in range(first, first + micro_batch)]
        yield rows_batch(blocks, idx)
