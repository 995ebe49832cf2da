"""Preparation: sources -> pieces -> tokens -> token store, streamed in bounded chunks.

The reader cuts documents into pieces (``split.py``) and hands chunks of about ``CHUNK_CHARS``
characters to the tokenizer, in-process or in ``data.num_workers`` spawned worker processes, one chunk
in flight per worker (``workers.py``); the writer appends each piece to its split's shards in corpus
order. So the result does not depend on the number of workers, and peak memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from moetrain.config.data import SAMPLE_FORMATS, DataConfig, TrainedTokenizerConfig
from moetrain.data.bpe import bpe_fingerprint, ensure_bpe
from moetrain.data.packing import sample_fit
from moetrain.data.prepare_samples import build_samples, check_records, sample_settings
from moetrain.data.sources import DocumentStream, Source, check_contents, data_sources, resolve_groups, source_files
from moetrain.data.split import cut_pieces, is_val_piece
from moetrain.data.store import (
    SHARD_TOKENS,
    SPLITS,
    ShardWriter,
    TokenCache,
    open_store,
    publish,
    temp_folder,
    touch_progress,
    wait_for_store,
)
from moetrain.data.tokenizers import build_tokenizer, file_sha256, token_dtype, tokenizer_file
from moetrain.data.workers import encoded
from moetrain.errors import UserError

CACHE_VERSION = 2  # 2: sharded store with index.json, pieces split rule (data.split_chars)
CHUNK_CHARS = 1 << 20  # characters per tokenizer task
WAIT_IDLE_S = 1800.0  # other ranks give up after this long without a sign of progress from rank 0
Log = Callable[[str], None]


def fingerprint(src: Source, files: list[Path], tokenizer: str) -> str:
    """The store of source ``src``: its files and settings, and the identity of the tokenizer (one for
    every source: ``tokenizer_identity`` of the whole config)."""
    h = hashlib.sha256()
    c = src.cfg
    fields = [tokenizer, c.format, c.text_field, c.hub, c.hub_split, c.val_fraction, c.max_tokens]
    if c.format in SAMPLE_FORMATS:  # chat data: the template and data.train_on shape the tokens and the mask
        fields += sample_settings(c)
    h.update(json.dumps([CACHE_VERSION, *fields, c.split_chars]).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def tokenizer_identity(cfg: DataConfig) -> str:
    """What the tokens depend on: 'byte' or a hub name as written; a tokenizer.json by its sha256 (not its
    path, so moving the file keeps the store and editing it re-tokenizes); a trained BPE by its fingerprint
    (which covers every source of a mixture: they share one tokenizer)."""
    if isinstance(cfg.tokenizer, TrainedTokenizerConfig):
        return f"bpe:{bpe_fingerprint(cfg, cfg.tokenizer)}"
    path = tokenizer_file(cfg.tokenizer)
    return cfg.tokenizer if path is None else f"sha256:{file_sha256(path)}"


@dataclass(frozen=True)
class PreparedData:
    """The published stores of every source of a data config, in ``data.sources`` order."""

    sources: list[Source]
    stores: list[TokenCache]

    @property
    def fingerprint(self) -> str:
        """What a checkpoint records of its data, and resume compares: the tokens' content hash (one source),
        or a hash of the sources' names, weights and contents. Moving or copying the corpus keeps it."""
        return self._combine([t.content or t.fingerprint for t in self.stores], "content-")

    @property
    def location_fingerprint(self) -> str:
        """The fingerprint of releases before the content hash (paths, sizes, mtimes): what their
        checkpoints recorded, still accepted on resume."""
        return self._combine([t.fingerprint for t in self.stores], "")

    def _combine(self, per_store: list[str], prefix: str) -> str:
        if len(self.stores) == 1 and self.sources[0].field == "data":
            return prefix + per_store[0]
        parts = [(s.name, s.weight, f) for s, f in zip(self.sources, per_store)]
        return "mix-" + prefix + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return max(t.vocab_size for t in self.stores)


def prepare_data(
    cfg: DataConfig, log: Log | None = None, shard_tokens: int = SHARD_TOKENS, only: str | None = None
) -> PreparedData:
    """Open the store of every source of ``cfg`` (``only``: of the one source of that index or name),
    preparing the missing ones first (after checking all of their contents, and training the tokenizer
    once when it is a trained BPE); check each fits."""
    log = log or (lambda _: None)
    sources = data_sources(cfg)
    if only is not None:
        sources = [pick_source(sources, only)]
    plans = []  # (source, its files, its folder, its store or None)
    tokenizer_id = tokenizer_identity(cfg)
    for src in sources:
        groups = resolve_groups(src.cfg, src.field)
        files = [p for group in groups for p in group]
        folder = Path(cfg.cache_dir) / fingerprint(src, files, tokenizer_id)
        store = open_store(folder)
        if store is None:
            check_contents(src.cfg, groups, src.field)  # every source, before anything is written
            if src.cfg.format in SAMPLE_FORMATS:
                check_records(src.cfg, groups)
        plans.append((src, groups, folder, store))
    tokenizer = cfg.tokenizer
    if isinstance(tokenizer, TrainedTokenizerConfig) and any(store is None for *_, store in plans):
        tokenizer = str(ensure_bpe(cfg, tokenizer, log))  # trained once, then found in data.cache_dir
    stores = []
    for src, groups, folder, store in plans:
        head = "" if src.field == "data" else f"source {src.name!r}: "
        if store is None:
            files = [p for group in groups for p in group]
            if src.cfg.format in SAMPLE_FORMATS:
                index = build_samples(src.cfg, tokenizer, groups, folder, log, shard_tokens, num_workers(src.cfg))
            else:
                index = _build(src.cfg, tokenizer, files, folder, log, shard_tokens)
            log(_summary(f"{head}prepared {folder}", index))
            store = open_store(folder)
        else:
            log(_summary(f"{head}already prepared (nothing to tokenize): {folder}", store.index))
        check_fits(store, src)
        if store.holds_samples:
            log(f"{head}{sample_fit(store, src.cfg, src.field).summary()}")
        stores.append(store)
    prepared = PreparedData(sources, stores)
    if cfg.sources is not None and only is None:
        log(_mixture_summary(prepared))
    return prepared


def pick_source(sources: list[Source], key: str) -> Source:
    """The source named ``key``, or at index ``key`` (a SLURM array task id)."""
    for i, src in enumerate(sources):
        if key in (src.name, str(i)):
            return src
    names = ", ".join(f"{i} ({src.name})" for i, src in enumerate(sources))
    raise UserError(f"--source {key!r}: no such data source; the sources are {names}")


def wait_for_data(cfg: DataConfig, idle_timeout_s: float = WAIT_IDLE_S) -> PreparedData:
    """Ranks other than 0: wait for the stores rank 0 prepares (polling their index files), then open them."""
    sources, stores, tokenizer_id = data_sources(cfg), [], tokenizer_identity(cfg)
    for src in sources:
        store = wait_for_store(Path(cfg.cache_dir) / fingerprint(src, source_files(src), tokenizer_id), idle_timeout_s)
        check_fits(store, src)
        stores.append(store)
    return PreparedData(sources, stores)


def prepare_tokens(cfg: DataConfig, log: Log | None = None, shard_tokens: int = SHARD_TOKENS) -> TokenCache:
    """``prepare_data`` of a one-source config: its store."""
    return _only_store(prepare_data(cfg, log, shard_tokens))


def wait_for_tokens(cfg: DataConfig, idle_timeout_s: float = WAIT_IDLE_S) -> TokenCache:
    """``wait_for_data`` of a one-source config: its store."""
    return _only_store(wait_for_data(cfg, idle_timeout_s))


def _only_store(prepared: PreparedData) -> TokenCache:
    if len(prepared.stores) != 1:
        raise ValueError("a mixture (data.sources) has one store per source: use prepare_data / wait_for_data")
    return prepared.stores[0]


def store_folder(cfg: DataConfig) -> Path:
    """``cache_dir/<fingerprint>``: where the store of a one-source config is (or will be) published."""
    (src,) = data_sources(cfg)
    return Path(cfg.cache_dir) / fingerprint(src, source_files(src), tokenizer_identity(cfg))


def check_fits(store: TokenCache, src: Source) -> None:
    cfg = src.cfg
    if store.holds_samples:  # samples longer than a row: refused or truncated (data.overlong), named
        sample_fit(store, cfg, src.field)
        return
    splits = store.index["splits"]
    need = cfg.seq_len + 1
    if all(splits[s]["tokens"] >= need for s in SPLITS):
        return
    pieces = splits["train"]["pieces"] + splits["val"]["pieces"]
    raise UserError(
        f"{src.field}: the corpus gives {splits['train']['tokens']} train and {splits['val']['tokens']} val tokens "
        f"({pieces} pieces of at most data.split_chars={cfg.split_chars} characters, "
        f"{splits['val']['pieces']} held out by data.val_fraction={cfg.val_fraction}); each split needs at least "
        f"data.seq_len + 1 = {need} tokens. Add data, lower data.seq_len, or lower data.split_chars "
        "so the corpus is cut into more pieces"
    )


def _mixture_summary(prepared: PreparedData) -> str:
    parts = []
    for src, store in zip(prepared.sources, prepared.stores):
        splits = store.index["splits"]
        parts.append(
            f"{src.name} {src.weight:.1%} of the blocks ({splits['train']['tokens']} train, "
            f"{splits['val']['tokens']} val tokens)"
        )
    return "mixture: " + "; ".join(parts)


def _summary(head: str, index: dict) -> str:
    tr, va = index["splits"]["train"], index["splits"]["val"]
    mb, s = index["source_bytes"] / 1e6, index["seconds"]
    if "format" in index:  # samples
        return (
            f"{head}: {index['documents']} {index['format']} samples, train {tr['samples']} samples / {tr['tokens']} "
            f"tokens ({tr['targets']} targets), val {va['samples']} samples / {va['tokens']} tokens ({va['targets']} "
            f"targets); {mb:.1f} MB in {s:.1f} s ({mb / max(s, 1e-9):.1f} MB/s, "
            f"{index['documents'] / max(s, 1e-9):.0f} samples/s, {index['workers']} workers)"
        )
    return (
        f"{head}: {index['documents']} documents, train {tr['tokens']} tokens ({len(tr['shards'])} shards), "
        f"val {va['tokens']} tokens; {mb:.1f} MB tokenized in {s:.1f} s ({mb / max(s, 1e-9):.1f} MB/s, "
        f"{index['workers']} workers)"
    )


def _build(cfg: DataConfig, tokenizer: str, files: list[Path], folder: Path, log: Log, shard_tokens: int) -> dict:
    """Tokenize every source with ``tokenizer`` (a trained BPE: its file) into a temp folder and publish
    it; returns the index."""
    start = time.perf_counter()
    tok = build_tokenizer(tokenizer)  # here: a bad tokenizer name fails before any worker starts
    dtype = token_dtype(tok.vocab_size)
    workers = num_workers(cfg)
    docs = DocumentStream(cfg, files)
    tmp = temp_folder(folder)
    try:
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        pieces = {s: 0 for s in SPLITS}
        total, documents, starts_doc, next_log = 0, 0, True, time.monotonic() + 10
        for ends, (tokens, lengths) in encoded(_chunks(docs, cfg.split_chars), tokenizer, workers):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for k, end in enumerate(ends):
                split = "val" if is_val_piece(pieces["train"] + pieces["val"], cfg.val_fraction) else "train"
                writers[split].append(tokens[offsets[k] : offsets[k + 1]], end)
                pieces[split] += 1
                documents, starts_doc = documents + starts_doc, end
                total += int(lengths[k])
                if cfg.max_tokens is not None and total >= cfg.max_tokens:
                    break
            touch_progress(tmp)
            if time.monotonic() > next_log:
                next_log += 10
                mb, s = docs.bytes_read / 1e6, time.perf_counter() - start
                log(f"preparing {folder.name}: {mb:.0f} MB, {total} tokens, {mb / s:.1f} MB/s")
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                break
        for w in writers.values():
            w.close()
        splits = {s: writers[s].summary(pieces[s]) for s in SPLITS}
        content = [dtype.name, tok.vocab_size, tok.eos_id, *(splits[s]["sha256"] for s in SPLITS)]
        index = {
            "version": CACHE_VERSION,
            "fingerprint": folder.name,
            # the tokens themselves: the same store wherever its files were read from (resume compares this)
            "content": hashlib.sha256(json.dumps(content).encode()).hexdigest()[:20],
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "shard_tokens": shard_tokens,
            "split_chars": cfg.split_chars,
            "val_fraction": cfg.val_fraction,
            "documents": documents,  # read, whole or in part (max_tokens); per split and shard: the ends
            "files": len(docs.files),
            "source_bytes": docs.bytes_read,
            "seconds": round(time.perf_counter() - start, 3),
            "workers": workers,
            "splits": splits,
        }
        publish(tmp, index, folder)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def num_workers(cfg: DataConfig) -> int:
    """``data.num_workers``; when null, the number of cores, except for the byte tokenizer, which runs
    in-process: it encodes at 130-155 MB/s there, and shipping its chunks to 2 workers made it slower
    (56-75 MB/s on 2 cores, docs/benchmarks.md). Chat records with the byte tokenizer too: 2 workers
    prepared them at about half the in-process speed on 2 cores (docs/benchmarks.md)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if cfg.tokenizer == "byte":
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunks(docs: DocumentStream, split_chars: int) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces in corpus order, grouped into chunks of about CHUNK_CHARS characters: (texts, is_last)."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for doc in docs:
        for text, last in cut_pieces(doc, split_chars):
            texts.append(text)
            ends.append(last)
            chars += len(text)
            if chars >= CHUNK_CHARS:
                yield texts, ends
                texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends
