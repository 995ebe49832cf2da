"""Data: HF ``datasets`` -> tokenizer -> memmap token cache -> packed blocks -> data-parallel shards.

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (B is the micro-batch size).

Tokens are written once per fingerprint (sources, tokenizer, split settings) to a flat memmap; a
sample is a block of S+1 tokens. The sample order is a pure function of (seed, epoch, global sample
index): optimizer step s covers global samples [s*G, (s+1)*G) with G = B * grad_accum * dp_size, and
data-parallel rank r takes slice r of each global micro-batch. Resuming needs only the step, and a
different data-parallel size sees the same global stream.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from moetrain.config.data import DataConfig
from moetrain.errors import UserError

CACHE_VERSION = 1
EXTENSIONS = {"text": (".txt", ".md", ".py", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


# --- sources ----------------------------------------------------------------------------------------


def default_corpus_files() -> list[Path]:
    """The Python standard library's own source files: present wherever Python is, real text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def resolve_files(cfg: DataConfig) -> list[Path]:
    """Every data file, in a stable order; raises UserError naming the path that matches nothing."""
    if not cfg.paths:
        return default_corpus_files() if cfg.hub is None else []
    files: list[Path] = []
    for i, pattern in enumerate(cfg.paths):
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p, cfg) is not None)
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(
                f"data.paths[{i}]: {pattern!r} matches no readable data file; fix the path, "
                "or remove data.paths to train on the built-in corpus"
            )
        for p in found:
            if not os.access(p, os.R_OK):
                raise UserError(f"data.paths[{i}]: {str(p)!r} is not readable (check its permissions)")
        files.extend(found)
    return files


def check_data_reachable(cfg: DataConfig) -> None:
    """Pre-flight check (also used by ``moetrain launch``): every configured source resolves."""
    files = resolve_files(cfg)
    for p in files:
        if _format_of(p, cfg) is None:
            raise UserError(
                f"data.format: cannot tell the format of {str(p)!r}; set data.format to text, jsonl or parquet"
            )


def _format_of(path: Path, cfg: DataConfig) -> str | None:
    if cfg.format != "auto":
        return cfg.format
    for fmt, exts in EXTENSIONS.items():
        if path.suffix.lower() in exts:
            return fmt
    return None


def iter_documents(cfg: DataConfig, files: list[Path]) -> Iterator[str]:
    """Documents through HF ``datasets``: a whole text file is one document; jsonl/parquet rows are."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.hub is not None and not files:
        ds = datasets.load_dataset(cfg.hub, split=cfg.hub_split)
        yield from _texts(ds, cfg.text_field, cfg.hub)
        return
    by_format: dict[str, list[str]] = {}
    for p in files:
        fmt = _format_of(p, cfg) or "text"
        if fmt in ("text", "jsonl"):
            check_utf8(p)  # HF datasets would fail with a traceback that names no file (or cache bad text)
        by_format.setdefault(fmt, []).append(str(p))
    for fmt, paths in by_format.items():
        if fmt == "text":
            ds = datasets.load_dataset("text", data_files=paths, sample_by="document", split="train")
            field = "text"
        else:
            ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=paths, split="train")
            field = cfg.text_field
        yield from _texts(ds, field, paths[0])


def check_utf8(path: Path) -> None:
    """Raise UserError naming ``path`` and the offset of its first byte that is not UTF-8 (~200 MB/s)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # the start of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise UserError(
                    f"data file {str(path)!r} is not UTF-8 text: byte {at} is 0x{exc.object[exc.start]:02x}; "
                    "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from data.paths"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _texts(ds, field: str, source: str) -> Iterator[str]:
    if field not in ds.column_names:
        raise UserError(f"data.text_field: column {field!r} not found in {source!r} (columns: {ds.column_names})")
    for batch in ds.iter(batch_size=512):
        yield from (t for t in batch[field] if t)


# --- tokenizers -------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes, plus one end-of-document token (256)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)


class HFTokenizer:
    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(
                f"data.tokenizer: {name!r} needs the transformers package (pip install 'moetrain[hf]'), "
                "or use data.tokenizer: byte"
            ) from None
        try:
            self.tok = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's path or name
            raise UserError(f"data.tokenizer: cannot load {name!r} ({exc})") from None
        self.name = name
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.vocab_size - 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def build_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


# --- token cache --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCache:
    folder: Path
    fingerprint: str
    vocab_size: int

    def tokens(self, split: Literal["train", "val"]) -> np.ndarray:
        meta = json.loads((self.folder / "meta.json").read_text())
        return np.memmap(self.folder / f"{split}.bin", dtype=meta["dtype"], mode="r")


def fingerprint(cfg: DataConfig, files: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                CACHE_VERSION,
                cfg.tokenizer,
                cfg.format,
                cfg.text_field,
                cfg.hub,
                cfg.hub_split,
                cfg.val_fraction,
                cfg.max_tokens,
            ]
        ).encode()
    )
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def prepare_tokens(cfg: DataConfig, build: bool = True) -> TokenCache:
    """Tokenize once into ``cache_dir/<fingerprint>/`` (train.bin, val.bin, meta.json written last).

    With ``build=False`` (non-zero ranks) the cache must already exist.
    """
    files = resolve_files(cfg)
    fp = fingerprint(cfg, files)
    folder = Path(cfg.cache_dir) / fp
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        if not build:
            raise RuntimeError(f"token cache {folder} missing (rank 0 should have built it)")
        _build_cache(cfg, files, folder, fp)
    meta = json.loads(meta_path.read_text())
    return TokenCache(folder, fp, meta["vocab_size"])


def _is_val(doc_index: int, val_fraction: float) -> bool:
    return (doc_index * 2654435761 % 10007) < val_fraction * 10007


def _build_cache(cfg: DataConfig, files: list[Path], folder: Path, fp: str) -> None:
    tok = build_tokenizer(cfg.tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    total = 0
    eos = np.asarray([tok.eos_id], dtype=np.int32)
    for i, text in enumerate(iter_documents(cfg, files)):
        ids = np.concatenate([tok.encode(text), eos])
        parts["val" if _is_val(i, cfg.val_fraction) else "train"].append(ids)
        total += ids.size
        if cfg.max_tokens is not None and total >= cfg.max_tokens:
            break
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, arrays in parts.items():
        arr = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        if arr.size < cfg.seq_len + 1:
            raise UserError(
                f"data: the {split} split has {arr.size} tokens, fewer than data.seq_len + 1 "
                f"({cfg.seq_len + 1}); add data or lower data.seq_len / raise data.val_fraction"
            )
        arr.tofile(tmp / f"{split}.bin")
        counts[split] = int(arr.size)
    meta = {
        "fingerprint": fp,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": np.dtype(dtype).name,
        "tokens": counts,
        "files": len(files),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, folder)  # atomic publish: a half-written cache is never seen
    except OSError:  # another process published it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# --- sampling ---------------------------------------------------------------------------------------


class PackedBlocks:
    """Fixed-length blocks of S+1 tokens (input + shifted target) over one split."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
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
