"""Samples packed into rows of ``seq_len + 1`` tokens, kept apart inside a row (chat, prompt-completion).

A row is read as today's blocks are: inputs are its first S tokens, targets its last S. A sample of n
tokens takes n slots of a row and gives n - 1 predictions, so it fits when n <= S + 1 (the last slot of
a row is only ever a target). Longer samples are refused, or cut to their first S + 1 tokens
(``data.overlong``); a cut sample left without a target token is dropped. Both are counted, and
``moetrain prepare`` prints the counts (``SampleFit.summary``).

**Packing policy** (``data.packing``):

- ``best_fit`` (the default): best fit decreasing -- samples from the longest down, each into the open
  row with the least room that still holds it, else a new row. The rows are then ordered by the first
  (corpus-order) sample each holds, and the samples of a row are in corpus order. A pure function of the
  sample lengths and S, so every rank computes the same rows. The rest of a row is padding.
- ``none``: one sample per row, in corpus order, the rest padding.

A row comes with ``segments`` (which sample each slot belongs to; padding is one more segment) and the
stored loss mask; ``sampling.py`` turns them into targets (-100 where no loss: masked tokens, padding,
and the first token of every sample, whose context would be another sample), positions that restart
at every sample, and the model's block-diagonal causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from moetrain.config.data import DataConfig
from moetrain.data.prepare_samples import describe_sample
from moetrain.data.store import SPLITS, TokenCache
from moetrain.errors import UserError


@dataclass(frozen=True)
class SplitFit:
    """The samples of one split that fit a row of ``capacity`` = S + 1 tokens (after truncation)."""

    starts: np.ndarray  # where each kept sample starts in the split
    lengths: np.ndarray  # its tokens in a row (at most capacity)
    samples: int  # samples stored
    truncated: int  # longer than capacity, cut (data.overlong: truncate)
    dropped: int  # of those, left without a target: not used
    longest: int


@dataclass(frozen=True)
class SampleFit:
    field: str
    capacity: int
    overlong: str
    splits: dict[str, SplitFit]

    def summary(self) -> str:
        parts = []
        for name, f in self.splits.items():
            part = f"{name} {f.samples} samples (longest {f.longest} tokens)"
            if f.truncated:
                part += f", {f.truncated} longer than data.seq_len + 1 = {self.capacity} tokens truncated"
                if f.dropped:
                    part += f" ({f.dropped} of them left without a target token and dropped)"
            parts.append(part)
        return "samples: " + "; ".join(parts) + f" (data.overlong: {self.overlong})"


def sample_fit(store: TokenCache, cfg: DataConfig, field: str = "data") -> SampleFit:
    """How the samples of both splits of ``store`` fit rows of ``data.seq_len + 1`` tokens; a UserError
    naming the first sample that is too long under ``data.overlong: refuse``, or a split left empty."""
    capacity = cfg.seq_len + 1
    return SampleFit(
        field, capacity, cfg.overlong, {s: fit_split(store, s, capacity, cfg.overlong, field) for s in SPLITS}
    )


def fit_split(store: TokenCache, split: Literal["train", "val"], capacity: int, overlong: str, field: str) -> SplitFit:
    """``fit_samples`` of one split of a samples store."""
    index = store.index
    table = store.samples(split)
    return fit_samples(
        np.asarray(table["start"], dtype=np.int64),
        index["splits"][split]["tokens"],
        lambda: store.mask(split),
        capacity,
        overlong,
        f"{field}: the {split} split",
        lambda i: describe_sample(index, table[i]),
    )


def fit_samples(
    starts: np.ndarray,
    total: int,
    mask: Callable[[], object],
    capacity: int,
    overlong: str,
    what: str,
    describe: Callable[[int], str],
) -> SplitFit:
    """The samples starting at ``starts`` (``total`` tokens in all; ``mask()`` their loss mask) that fit
    rows of ``capacity`` tokens; a UserError naming (``describe``) the first one that is too long under
    ``data.overlong: refuse``, or when none is left."""
    lengths = np.diff(np.append(starts, total))
    over = np.flatnonzero(lengths > capacity)
    if len(over) and overlong == "refuse":
        first = int(over[0])
        raise UserError(
            f"{what}: {describe(first)} gives {lengths[first]} tokens, more than data.seq_len + 1 = {capacity} "
            f"({len(over)} of its {len(starts)} samples are; the longest has {lengths.max()}); raise data.seq_len, "
            "shorten or remove them, or set data.overlong: truncate to keep their first data.seq_len + 1 tokens"
        )
    keep = np.ones(len(starts), dtype=bool)
    if len(over):
        mask_T = mask()
        for i in over:  # a cut sample whose targets all lay past the cut has nothing left to learn
            keep[i] = bool(mask_T[int(starts[i]) + 1 : int(starts[i]) + capacity].any())
    fit = SplitFit(
        starts[keep],
        np.minimum(lengths, capacity)[keep],
        len(starts),
        len(over),
        int((~keep).sum()),
        int(lengths.max()) if len(lengths) else 0,
    )
    if not len(fit.starts):
        raise UserError(
            f"{what} holds no sample with a target token (of {len(starts)} samples, {fit.dropped} were truncated "
            f"to data.seq_len + 1 = {capacity} tokens and lost their targets); add data or raise data.seq_len"
        )
    return fit


def best_fit_rows(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best fit decreasing: the samples (indices into ``lengths``) of each row of ``capacity`` slots, in
    corpus order, the rows ordered by their first sample.

    Open rows are kept in buckets by their free room; the smallest room >= n is found with one vectorised
    search over the bucket flags (a few microseconds per sample at S = 4096)."""
    order = np.argsort(-lengths, kind="stable")
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    has_room = np.zeros(capacity + 1, dtype=bool)
    rows: list[list[int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        room = n + int(np.argmax(has_room[n:]))
        if has_room[room]:
            r = by_room[room].pop()
            if not by_room[room]:
                has_room[room] = False
        else:
            r, room = len(rows), capacity
            rows.append([])
        rows[r].append(i)
        left = room - n
        by_room[left].append(r)
        has_room[left] = True
    packed = [np.sort(np.asarray(r, dtype=np.int64)) for r in rows]
    packed.sort(key=lambda r: int(r[0]))
    return packed


class PackedSamples:
    """The rows of one split of samples: ``row(i)`` tokens, ``packed_row(i)`` tokens, loss mask and segments,
    each of ``seq_len + 1`` slots. ``tokens`` and ``mask``: len() and [a:b] (a ShardedTokens or an array)."""

    isolated = True

    def __init__(self, tokens, mask, fit: SplitFit, pad_id: int, cfg: DataConfig) -> None:
        self.seq_len = cfg.seq_len
        self.tokens, self.mask, self.fit, self.pad_id = tokens, mask, fit, pad_id
        if cfg.packing == "best_fit":
            self.rows = best_fit_rows(fit.lengths, cfg.seq_len + 1)
        else:
            self.rows = [np.asarray([i]) for i in range(len(fit.lengths))]
        self.num_blocks = len(self.rows)

    @classmethod
    def from_store(
        cls, store: TokenCache, split: Literal["train", "val"], cfg: DataConfig, field: str = "data"
    ) -> PackedSamples:
        fit = fit_split(store, split, cfg.seq_len + 1, cfg.overlong, field)
        return cls(store.tokens(split), store.mask(split), fit, int(store.index["eos_id"]), cfg)

    def packed_row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``seq_len + 1`` slots: tokens (int64), loss mask (bool), segment of each slot (int64)."""
        size = self.seq_len + 1
        tokens = np.full(size, self.pad_id, dtype=np.int64)
        mask = np.zeros(size, dtype=bool)
        segments = np.full(size, len(self.rows[i]), dtype=np.int64)  # padding: a segment of its own
        at = 0
        for seg, k in enumerate(self.rows[i].tolist()):
            start, n = int(self.fit.starts[k]), int(self.fit.lengths[k])
            tokens[at : at + n] = self.tokens[start : start + n]
            mask[at : at + n] = self.mask[start : start + n] != 0
            segments[at : at + n] = seg
            at += n
        return tokens, mask, segments

    def row(self, i: int) -> np.ndarray:
        return self.packed_row(i)[0]

    def get(self, indices: list[int]):
        """The rows ``indices`` as a ``sampling.Batch`` (as ``PackedBlocks.get``)."""
        from moetrain.data.sampling import rows_batch  # torch: not when prepare imports this module

        return rows_batch(self, indices)


def split_rows(store: TokenCache, split: Literal["train", "val"], cfg: DataConfig, field: str = "data"):
    """The rows of one split of one source's store: ``PackedSamples`` for a samples store (chat,
    prompt-completion), else ``sampling.PackedBlocks`` (a segment per document under
    ``data.document_masking``). ``cfg``: the source's data config."""
    if store.holds_samples:
        return PackedSamples.from_store(store, split, cfg, field)
    from moetrain.data.sampling import PackedBlocks  # torch: not when prepare imports this module

    return PackedBlocks(store.tokens(split), cfg.seq_len, store.index["eos_id"] if cfg.document_masking else None)
