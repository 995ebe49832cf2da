"""Packing: best fit decreasing into rows of seq_len + 1 tokens, each sample once and whole; rows carry their
samples' segments and loss mask; targets count only inside a sample and in its mask; document masking cuts
text rows at the end-of-document token; a mixture of chat and text rows is one kind of batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from chat_data import chat_cfg, conversation, write_jsonl

from moetrain import data
from moetrain.backbone.packing import block_causal_mask, segment_positions
from moetrain.data.packing import best_fit_rows

IGNORE = data.IGNORE


def test_best_fit_decreasing_on_a_worked_example():
    """Capacity 8, lengths 5 4 3 3 2 1: 5 opens row A (room 3), 4 row B (room 4), the first 3 goes to A (least
    room that holds it), the second to B (room 1), 2 fits nowhere: row C; 1 goes to B, the tightest."""
    rows = best_fit_rows(np.array([5, 4, 3, 3, 2, 1]), 8)
    assert [r.tolist() for r in rows] == [[0, 2], [1, 3, 5], [4]]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_places_every_sample_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    capacity = 129
    lengths = rng.integers(2, capacity + 1, size=500)
    rows = best_fit_rows(lengths, capacity)
    flat = np.concatenate(rows)
    assert sorted(flat.tolist()) == list(range(500))
    assert all(lengths[r].sum() <= capacity for r in rows)
    assert all(np.all(np.diff(r) > 0) for r in rows)  # corpus order inside a row
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)  # rows ordered by their first sample
    assert len(rows) >= math.ceil(lengths.sum() / capacity)
    next_fit, room = 0, 0  # what filling rows in corpus order would take
    for n in lengths.tolist():
        if n > room:
            next_fit, room = next_fit + 1, capacity
        room -= n
    assert len(rows) < next_fit
    assert [r.tolist() for r in best_fit_rows(lengths, capacity)] == [r.tolist() for r in rows]  # a pure function


@pytest.fixture
def chat_store(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i, turns=1 + i % 2) for i in range(40)])
    cfg = chat_cfg([path], tmp_path / "cache", seq_len=256)
    return data.prepare_tokens(cfg), cfg


def test_rows_hold_their_samples_whole_with_segments_mask_and_padding(chat_store):
    store, cfg = chat_store
    rows = data.split_rows(store, "train", cfg)
    table, tokens, mask = store.samples("train"), store.tokens("train"), store.mask("train")
    starts = list(table["start"]) + [len(tokens)]
    for i in range(rows.num_blocks):
        row_tokens, row_mask, segments = rows.packed_row(i)
        at = 0
        for seg, k in enumerate(rows.rows[i].tolist()):
            a, b = starts[k], starts[k + 1]
            assert np.array_equal(row_tokens[at : at + b - a], tokens[a:b])
            assert np.array_equal(row_mask[at : at + b - a], mask[a:b] != 0)
            assert (segments[at : at + b - a] == seg).all()
            at += b - a
        assert (row_tokens[at:] == store.index["eos_id"]).all() and not row_mask[at:].any()
        assert (segments[at:] == len(rows.rows[i])).all()  # padding: a segment of its own
    assert sorted(np.concatenate(rows.rows).tolist()) == list(range(len(table)))
    one = data.split_rows(store, "train", cfg.model_copy(update={"packing": "none"}))
    assert one.num_blocks == len(table) > rows.num_blocks


def test_targets_count_inside_a_sample_and_its_mask_only(chat_store):
    store, cfg = chat_store
    rows = data.split_rows(store, "val", cfg)
    batch = rows.get([0])
    tokens, mask, segments = rows.packed_row(0)
    y = batch.targets_BS[0].numpy()
    for j in range(cfg.seq_len):
        counted = mask[j + 1] and segments[j + 1] == segments[j]
        assert y[j] == (tokens[j + 1] if counted else IGNORE)
    first_tokens = np.flatnonzero(np.diff(segments[: cfg.seq_len + 1]) != 0)  # inputs whose target opens a sample
    assert (y[first_tokens] == IGNORE).all() and (y != IGNORE).sum() > 0
    assert torch.equal(batch.segments_BS[0], torch.from_numpy(segments[:-1]))


def test_document_masking_cuts_text_rows_after_each_end_of_document():
    eos = 9
    tokens = np.array([1, 2, eos, 3, 4, 5, eos, 6, 7, 8, 1, 2, 3], dtype=np.uint16)
    blocks = data.PackedBlocks(tokens, seq_len=8, eos_id=eos)
    x, y, segments = blocks.get([0])
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert y.tolist() == [[2, eos, IGNORE, 4, 5, eos, IGNORE, 7]]  # the token after an end: another document's
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    plain = data.PackedBlocks(tokens, seq_len=8).get([0])
    assert plain.segments_BS is None and torch.equal(plain.tokens_BS, x)


def test_segment_positions_and_the_block_causal_mask():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    assert segment_positions(segments).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[1, 0].tolist() == torch.ones(6, 6, dtype=torch.bool).tril().tolist()  # one sample: causal
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:2, :2] = want[2:5, 2:5] = want[5:, 5:] = True
    assert mask[0, 0].tolist() == (want & torch.ones(6, 6, dtype=torch.bool).tril()).tolist()


def test_a_mixture_of_chat_and_text_gives_one_kind_of_batch(chat_store):
    store, cfg = chat_store
    chat = data.split_rows(store, "train", cfg)
    text = data.PackedBlocks(np.arange(2000, dtype=np.uint16) % 250, seq_len=cfg.seq_len)
    stream = data.TrainStream([chat, text], seed=1, micro_batch=16, grad_accum=1, dp_rank=0, dp_size=1, weights=[1, 1])
    assert stream.isolated
    x, y, segments = stream.batch(0, 0)
    assert segments is not None and x.shape == y.shape == segments.shape == (16, cfg.seq_len)
    text_rows = [i for i in range(16) if (segments[i] == 0).all() and (y[i] != IGNORE).all()]
    chat_rows = [i for i in range(16) if i not in text_rows]
    assert text_rows and chat_rows  # both kinds in one batch
    assert all((y[i] == IGNORE).any() for i in chat_rows)
    alone = data.TrainStream(text, seed=1, micro_batch=4, grad_accum=1, dp_rank=0, dp_size=1)
    assert not alone.isolated and alone.batch(0, 0).segments_BS is None
