"""The token store: fixed-size binary shards per split plus ``index.json``, written last.

    cache_dir/<fingerprint>/
        train_00000.bin  train_00001.bin ...   at most ``shard_tokens`` tokens each (uint16 / uint32)
        val_00000.bin ...
        index.json                             counts per split and shard, dtype, vocab, eos, tokenizer

A store of chat / prompt-completion samples (``index["format"]``) also holds, per split, a loss mask
beside each token shard (``train_00000.mask.bin``, uint8, 1 = the token is a target) and a sample table
(``train_samples.bin``: the start of each sample in the split, and the index of its record source and
its line or row, ``SAMPLE_DTYPE``). A store without them (text) reads as before.

A store is built in ``cache_dir/<fingerprint>.tmp-<host>-<pid>/`` and published by renaming that
folder, so a folder named by its fingerprint is always complete; a killed preparation leaves only a
temp folder, which the next preparation on the same host removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from moetrain.errors import UserError

INDEX = "index.json"
SHARD_TOKENS = 1 << 28  # 512 MB of uint16 per shard file
SPLITS = ("train", "val")
SAMPLE_DTYPE = np.dtype([("start", "<i8"), ("source", "<i4"), ("row", "<i4")])
MASK_SUFFIX = ".mask.bin"


class ShardedTokens:
    """One split's tokens over its shard memmaps: ``len()`` and ``[a:b]`` (a numpy array, across shard
    boundaries), like the flat memmap it replaces."""

    def __init__(self, files: list[Path], counts: list[int], dtype: str) -> None:
        self.dtype = np.dtype(dtype)
        self._maps = [np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)) for f, n in zip(files, counts) if n]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])  # shard k holds [starts[k], starts[k+1])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            return self._range(start, max(start, stop))
        i = key + len(self) if key < 0 else key
        if not 0 <= i < len(self):
            raise IndexError(f"token {key} out of range ({len(self)} tokens)")
        return self._range(i, i + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        k = first
        while start < stop:
            lo = start - int(self._starts[k])
            hi = min(stop, int(self._starts[k + 1])) - int(self._starts[k])
            parts.append(self._maps[k][lo:hi])
            start = int(self._starts[k]) + hi
            k += 1
        if len(parts) == 1:
            return np.asarray(parts[0])
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


@dataclass(frozen=True)
class TokenCache:
    """A published token store (``index.json`` read once)."""

    folder: Path
    fingerprint: str  # the folder's name: where the tokens came from (paths, sizes, mtimes) and the settings
    vocab_size: int
    content: str | None = None  # a hash of the tokens themselves (None: a store written before it was kept)

    @property
    def index(self) -> dict:
        return json.loads((self.folder / INDEX).read_text())

    def tokens(self, split: Literal["train", "val"]) -> ShardedTokens:
        index = self.index
        shards = index["splits"][split]["shards"]
        return ShardedTokens([self.folder / s["file"] for s in shards], [s["tokens"] for s in shards], index["dtype"])

    @property
    def holds_samples(self) -> bool:
        """A store of chat / prompt-completion samples (loss mask and sample table), not of documents."""
        return "format" in self.index

    def mask(self, split: Literal["train", "val"]) -> ShardedTokens:
        """The loss mask of a samples store, aligned with ``tokens(split)``."""
        shards = self.index["splits"][split]["mask_shards"]
        return ShardedTokens([self.folder / s["file"] for s in shards], [s["tokens"] for s in shards], "uint8")

    def samples(self, split: Literal["train", "val"]) -> np.ndarray:
        """The sample table of a samples store (``SAMPLE_DTYPE``), in corpus order."""
        info = self.index["splits"][split]
        if not info["samples"]:
            return np.zeros(0, SAMPLE_DTYPE)
        return np.memmap(self.folder / info["sample_file"], dtype=SAMPLE_DTYPE, mode="r", shape=(info["samples"],))


def open_store(folder: Path) -> TokenCache | None:
    """The store published in ``folder``, or None when there is none (yet)."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except FileNotFoundError:
        return None
    return TokenCache(folder, index["fingerprint"], index["vocab_size"], index.get("content"))


# --- writing ------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends one split's tokens to ``<split>_NNNNN.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, suffix: str = ".bin") -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.suffix = suffix  # MASK_SUFFIX: a loss mask's shards, cut where the token shards are
        self.shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._sha = hashlib.sha256()  # the split's content: every piece's tokens and whether it ends a document

    def append(self, tokens: np.ndarray, doc_end: bool) -> None:
        """Write ``tokens`` (one piece); ``doc_end``: the piece ends its document."""
        tokens = tokens.astype(self.dtype, copy=False)
        self._sha.update(tokens.tobytes())
        self._sha.update(b"\x01" if doc_end else b"\x00")
        while True:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += min(room, len(tokens))
            if len(tokens) <= room:
                self.shards[-1]["documents"] += int(doc_end)
                return
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}{self.suffix}"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self, pieces: int) -> dict:
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "pieces": pieces,
            "shards": self.shards,
            "sha256": self._sha.hexdigest(),
        }


class SampleWriter:
    """Appends one split's sample table (``SAMPLE_DTYPE`` rows) to ``<split>_samples.bin``."""

    def __init__(self, folder: Path, split: str) -> None:
        self.name = f"{split}_samples.bin"
        self._file = open(folder / self.name, "wb")
        self.count = 0

    def append(self, start: int, source: int, row: int) -> None:
        self._file.write(np.array([(start, source, row)], dtype=SAMPLE_DTYPE).tobytes())
        self.count += 1

    def close(self) -> None:
        self._file.close()


def temp_folder(folder: Path) -> Path:
    """A fresh build folder beside ``folder``, after removing this host's stale ones (dead pids)."""
    host = socket.gethostname()
    for old in folder.parent.glob(f"{folder.name}.tmp-{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{host}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish(tmp: Path, index: dict, folder: Path) -> None:
    """Write the index (last) and rename ``tmp`` to ``folder``: a store is complete or absent."""
    (tmp / "progress").unlink(missing_ok=True)
    (tmp / (INDEX + ".part")).write_text(json.dumps(index, indent=1))
    os.replace(tmp / (INDEX + ".part"), tmp / INDEX)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process published the same fingerprint first
        shutil.rmtree(tmp, ignore_errors=True)


def touch_progress(tmp: Path) -> None:
    """A sign of life for ranks waiting on another host (see ``wait_for_store``)."""
    (tmp / "progress").write_text(str(time.time()))


def wait_for_store(folder: Path, idle_timeout_s: float, poll_s: float = 0.5) -> TokenCache:
    """Poll for ``folder/index.json`` while rank 0 prepares the store (a file marker, not a collective).

    Gives up after ``idle_timeout_s`` seconds without a sign of progress: neither the store nor a temp
    folder of this fingerprint whose ``progress`` file changed."""
    last_change = time.monotonic()
    seen: dict[Path, float] = {}
    while (store := open_store(folder)) is None:
        for progress in folder.parent.glob(f"{folder.name}.tmp-*/progress"):
            try:
                mtime = progress.stat().st_mtime
            except FileNotFoundError:
                continue
            if seen.get(progress) != mtime:
                seen[progress] = mtime
                last_change = time.monotonic()
        if time.monotonic() - last_change > idle_timeout_s:
            raise UserError(
                f"data: waited {idle_timeout_s:.0f} s for rank 0 to publish the token store {str(folder)!r} "
                f"and saw no progress; is data.cache_dir ({str(folder.parent)!r}) on a file system every "
                "node shares? Run `moetrain prepare CONFIG` once before training to prepare it ahead"
            )
        time.sleep(poll_s)
    return store
