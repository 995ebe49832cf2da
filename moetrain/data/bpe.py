"""Byte-level BPE trained by moetrain on the configured sources (``data.tokenizer: {train: bpe, ...}``).

Trained with the Hugging Face ``tokenizers`` library, streaming: the trainer is fed the train split's
pieces (the same pieces and held-out rule as preparation, so validation text does not shape the
vocabulary), at most ``max_chars`` characters of them; a chat source gives its records' message texts. A mixture (``data.sources``) trains one tokenizer on all sources, each
source in turn (with ``max_chars``, each gets its weight's share of it). The result is published
atomically as

    data.cache_dir/tokenizers/<fingerprint>/tokenizer.json

where the fingerprint hashes the settings and the sources (as the store's fingerprint does), so a
config trains its tokenizer once and every later run (and every rank) finds it by name.

The vocabulary: ``<|endoftext|>`` is id 0 (the end-of-document token, ``eos_id``), the 256 byte
symbols follow, then the merges in the order they were learned.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from moetrain.config.data import SAMPLE_FORMATS, DataConfig, TrainedTokenizerConfig
from moetrain.data.records import record_texts
from moetrain.data.sources import DocumentStream, data_sources, source_files
from moetrain.data.split import cut_pieces, is_val_piece
from moetrain.data.tokenizers import TOKENIZER_FILE

BPE_VERSION = 1  # bump when the training recipe changes (pre-tokenizer, special tokens, text fed)
EOS_TOKEN = "<|endoftext|>"
Log = Callable[[str], None]


def bpe_fingerprint(cfg: DataConfig, spec: TrainedTokenizerConfig) -> str:
    """Hash of the training settings and the sources: what the trained vocabulary depends on."""
    h = hashlib.sha256()
    for k, src in enumerate(data_sources(cfg)):
        c = src.cfg
        fields = [c.format, c.text_field, c.hub, c.hub_split, c.split_chars, c.val_fraction]
        head = [BPE_VERSION, spec.model_dump(mode="json"), *fields]
        if cfg.sources is not None:
            head += [src.name, src.weight]
        if k == 0:  # one source: the hash of the releases before mixtures
            h.update(json.dumps(head).encode())
        else:
            h.update(("\0" + json.dumps(head)).encode())
        for p in source_files(src):
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def bpe_path(cfg: DataConfig, spec: TrainedTokenizerConfig) -> Path:
    """``cache_dir/tokenizers/<fingerprint>/tokenizer.json``: where this tokenizer is (or will be)."""
    return Path(cfg.cache_dir) / "tokenizers" / bpe_fingerprint(cfg, spec) / TOKENIZER_FILE


def training_texts(cfg: DataConfig, max_chars: int | None) -> Iterator[str]:
    """The train split's pieces of every source in corpus order (val pieces skipped), stopping after
    ``max_chars`` (a mixture: each source after its weight's share of it)."""
    for src in data_sources(cfg):
        budget = None if max_chars is None else max(1, round(max_chars * src.weight))
        yield from _source_texts(src.cfg, source_files(src), budget)


def _source_texts(cfg: DataConfig, files: list[Path], max_chars: int | None) -> Iterator[str]:
    """A source's train pieces; of a chat / prompt-completion source, each train record's text (record i
    is held out as piece i is)."""
    if cfg.format in SAMPLE_FORMATS:
        pieces = ((text, True) for text in record_texts(cfg))
    else:
        pieces = (piece for doc in DocumentStream(cfg, files) for piece in cut_pieces(doc, cfg.split_chars))
    chars, index = 0, 0
    for text, _ in pieces:
        held_out = is_val_piece(index, cfg.val_fraction)
        index += 1
        if held_out:
            continue
        yield text
        chars += len(text)
        if max_chars is not None and chars >= max_chars:
            return


def ensure_bpe(cfg: DataConfig, spec: TrainedTokenizerConfig, log: Log | None = None) -> Path:
    """The trained tokenizer's file, training it first when it is missing."""
    log = log or (lambda _: None)
    path = bpe_path(cfg, spec)
    if path.is_file():
        log(f"tokenizer: byte-level BPE already trained: {path}")
        return path
    start = time.perf_counter()
    tok, chars = train_bpe(training_texts(cfg, spec.max_chars), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TOKENIZER_FILE}.tmp-{os.getpid()}")
    try:
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: a reader sees no file or the whole file
    finally:
        tmp.unlink(missing_ok=True)
    log(
        f"tokenizer: trained a byte-level BPE of {tok.get_vocab_size()} tokens on {chars / 1e6:.1f} M characters "
        f"in {time.perf_counter() - start:.1f} s: {path}"
    )
    return path


def train_bpe(texts: Iterator[str], spec: TrainedTokenizerConfig):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on ``texts``; returns it and the characters fed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, on bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=[EOS_TOKEN],  # first: id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not: nothing is unknown
        show_progress=False,
    )
    counted = _Counted(texts)
    tok.train_from_iterator(counted, trainer=trainer)
    return tok, counted.chars


class _Counted:
    """An iterator of texts that counts the characters it hands out."""

    def __init__(self, texts: Iterator[str]) -> None:
        self.texts, self.chars = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            yield text
