"""Preparation of a chat / prompt-completion source: records -> samples (tokens, loss mask) -> token store.

The same streaming pipeline as documents (``prepare.py``): records are read in corpus order, grouped into
chunks of about ``CHUNK_CHARS`` characters and encoded in-process or in spawned workers
(``sample_encoding.py``); the writer appends each sample's tokens and mask to its split's shards and its
start to the split's sample table (``store.py``). Record ``i`` is held out as piece ``i`` is
(``split.py``). Samples are stored whole: ``data.seq_len`` (and with it truncation) applies when the
store is opened (``packing.py``), so it can change without re-tokenizing.

Before anything is written: every record's shape is checked (``check_records``) and the template renders
the first conversation; a record the template cannot render is found while encoding, and the preparation
then stops with its message and publishes nothing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from moetrain.config.data import DataConfig
from moetrain.data.chat_template import data_chat_template
from moetrain.data.records import RecordSource, RecordStream, Where, checked_record, record_sources
from moetrain.data.sample_encoding import SampleEncoder
from moetrain.data.split import is_val_piece
from moetrain.data.store import MASK_SUFFIX, SPLITS, SampleWriter, ShardWriter, publish, temp_folder, touch_progress
from moetrain.data.tokenizers import build_tokenizer, token_dtype
from moetrain.data.workers import encoded

CHUNK_CHARS = 1 << 20  # characters of content per encoding task
Log = Callable[[str], None]


def sample_settings(cfg: DataConfig) -> list:
    """What a samples store depends on beyond documents' settings (for the fingerprint): the chat
    template (its text and variables) and ``data.train_on``."""
    if cfg.format != "chat":
        return []
    return [cfg.train_on, data_chat_template(cfg.tokenizer, cfg.chat_template).identity]


def check_records(cfg: DataConfig, groups: list[list[Path]]) -> None:
    """Every record of a one-source config is a well-formed sample (``records.checked_record``), and the chat
    template renders the first one: one read pass, before anything is written."""
    sources = record_sources(cfg, groups)
    first = None
    for where, record in RecordStream(cfg, sources):
        rec = checked_record(record, cfg.format, sources[where.source].describe(where.row))
        if first is None:
            first = (rec, where)
    if first is not None and cfg.format == "chat":
        rec, where = first
        data_chat_template(cfg.tokenizer, cfg.chat_template).assistant_spans(
            rec["messages"], sources[where.source].describe(where.row)
        )


def build_samples(
    cfg: DataConfig, tokenizer: str, groups: list[list[Path]], folder: Path, log: Log, shard_tokens: int, workers: int
) -> dict:
    """Encode every record of a one-source config with ``tokenizer`` (a trained BPE: its file) into a temp
    folder and publish it; returns the index."""
    start = time.perf_counter()
    tok = build_tokenizer(tokenizer)  # a bad tokenizer fails before any worker starts
    dtype = token_dtype(tok.vocab_size)
    sources = record_sources(cfg, groups)
    template = data_chat_template(cfg.tokenizer, cfg.chat_template) if cfg.format == "chat" else None
    spec = SampleEncoder(tokenizer, cfg.format, template, cfg.train_on, tuple(sources))
    records = RecordStream(cfg, sources)
    tmp = temp_folder(folder)
    try:
        tokens = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        masks = {s: ShardWriter(tmp, s, np.dtype(np.uint8), shard_tokens, MASK_SUFFIX) for s in SPLITS}
        table = {s: SampleWriter(tmp, s) for s in SPLITS}
        written = {s: 0 for s in SPLITS}  # tokens of each split so far: where its next sample starts
        targets = {s: 0 for s in SPLITS}
        total, index_of_sample, next_log = 0, 0, time.monotonic() + 10
        for wheres, (ids, mask, lengths) in encoded(_chunks(records), spec, workers):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for k, where in enumerate(wheres):
                split = "val" if is_val_piece(index_of_sample, cfg.val_fraction) else "train"
                index_of_sample += 1
                a, b = offsets[k], offsets[k + 1]
                table[split].append(written[split], where.source, where.row)
                tokens[split].append(ids[a:b], True)
                masks[split].append(mask[a:b], True)
                written[split] += int(b - a)
                targets[split] += int(mask[a + 1 : b].sum())  # token 0 of a sample is never a target
                total += int(b - a)
                if cfg.max_tokens is not None and total >= cfg.max_tokens:
                    break
            touch_progress(tmp)
            if time.monotonic() > next_log:
                next_log += 10
                mb, s = records.bytes_read / 1e6, time.perf_counter() - start
                log(f"preparing {folder.name}: {mb:.0f} MB, {index_of_sample} samples, {mb / s:.1f} MB/s")
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                break
        splits = {}
        for s in SPLITS:
            for w in (tokens[s], masks[s], table[s]):
                w.close()
            splits[s] = tokens[s].summary(table[s].count)
            splits[s].update(
                samples=table[s].count, sample_file=table[s].name, mask_shards=masks[s].shards, targets=targets[s]
            )
        index = {
            "version": 2,
            "fingerprint": folder.name,
            "format": cfg.format,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "shard_tokens": shard_tokens,
            "val_fraction": cfg.val_fraction,
            "chat_template": template.origin if template is not None else None,
            "train_on": cfg.train_on if template is not None else None,
            "record_sources": [{"path": str(r.path), "kind": r.kind} for r in sources],
            "documents": index_of_sample,  # samples read
            "files": sum(len(g) for g in groups),
            "source_bytes": records.bytes_read,
            "seconds": round(time.perf_counter() - start, 3),
            "workers": workers,
            "splits": splits,
        }
        publish(tmp, index, folder)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _chunks(records: RecordStream) -> Iterator[tuple[list[dict], list[Where]]]:
    """Records in corpus order, grouped into chunks of about CHUNK_CHARS characters of content."""
    batch: list[dict] = []
    wheres: list[Where] = []
    chars = 0
    for where, record in records:
        batch.append(record)
        wheres.append(where)
        chars += _content_chars(record)
        if chars >= CHUNK_CHARS:
            yield batch, wheres
            batch, wheres, chars = [], [], 0
    if batch:
        yield batch, wheres


def _content_chars(record: dict) -> int:
    messages = record.get("messages")
    if isinstance(messages, list):
        return sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
    return len(str(record.get("prompt", ""))) + len(str(record.get("completion", "")))


def describe_sample(index: dict, table_row) -> str:
    """Where a sample of a store came from (its record), from the store's index and its sample table row."""
    src = index["record_sources"][int(table_row["source"])]
    return RecordSource(Path(src["path"]), src["kind"]).describe(int(table_row["row"]))
