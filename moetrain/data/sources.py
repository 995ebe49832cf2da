"""Data sources: which files, checked before anything is written, and read as a stream of documents.

Local text / jsonl files are read directly, in bounded chunks (a text file is one document however
large; a jsonl row is one); parquet through pyarrow batches; a hub dataset through HF ``datasets`` in
streaming mode. Nothing here holds a whole corpus, or a whole large file, in memory.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from moetrain.config.data import SAMPLE_FORMATS, DataConfig
from moetrain.errors import UserError

EXTENSIONS = {"text": (".txt", ".md", ".py", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
# One read of a text file. NOTE: kept under glibc's initial mmap threshold (128 KiB): with 1 MiB reads the
# heap fragmented and peak RSS grew with the size of a single large file (61 MB at 15 MB, 113 MB at 400 MB).
READ_BYTES = 1 << 16
# A folder written by datasets' save_to_disk (a Dataset: state.json; a DatasetDict: dataset_dict.json).
DATASETS_MARKERS = ("state.json", "dataset_dict.json")


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASETS_MARKERS)


def default_corpus_files() -> list[Path]:
    """The Python standard library's own source files: present wherever Python is, real text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]  # pruned, not walked (site-packages is large)
        found.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(found)


@dataclass(frozen=True)
class Source:
    """One source of the data: ``cfg`` is the data config of this source alone (its paths / hub, format
    and text field; ``sources`` None), ``field`` names it in messages, ``weight`` is its normalised share."""

    name: str
    weight: float
    cfg: DataConfig
    field: str


def data_sources(cfg: DataConfig) -> list[Source]:
    """The sources of ``cfg``: one (``data.paths`` / ``data.hub``, named "data") or the mixture's."""
    if cfg.sources is None:
        return [Source("data", 1.0, cfg, "data")]
    total = sum(s.weight for s in cfg.sources)
    out = []
    for i, (src, name) in enumerate(zip(cfg.sources, cfg.source_names())):
        own = src.model_dump(include={"paths", "hub", "hub_split", "format", "text_field"})
        out.append(
            Source(name, src.weight / total, cfg.model_copy(update={**own, "sources": None}), f"data.sources[{i}]")
        )
    return out


def resolve_files(cfg: DataConfig) -> list[Path]:
    """Every data file (of every source), in a stable order; raises UserError naming the path that
    matches nothing."""
    return [p for src in data_sources(cfg) for p in source_files(src)]


def source_files(src: Source) -> list[Path]:
    """The files of one source, in a stable order."""
    return [p for group in resolve_groups(src.cfg, src.field) for p in group]


def resolve_groups(cfg: DataConfig, field: str = "data") -> list[list[Path]]:
    """The files of each ``paths`` entry of a one-source config (one group: the built-in corpus when
    none is given); ``field`` names the source in messages."""
    if not cfg.paths:
        return [default_corpus_files()] if cfg.hub is None else []
    groups: list[list[Path]] = []
    for i, pattern in enumerate(cfg.paths):
        path = Path(pattern).expanduser()
        if cfg.format in SAMPLE_FORMATS and is_datasets_folder(path):
            found = sorted(p for p in path.rglob("*") if p.is_file())  # read whole (records.py); all in the fingerprint
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and format_of(p, cfg) is not None)
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(
                f"{field}.paths[{i}]: {pattern!r} matches no readable data file; fix the path"
                + (", or remove data.paths to train on the built-in corpus" if field == "data" else "")
            )
        for p in found:
            if not os.access(p, os.R_OK):
                raise UserError(f"{field}.paths[{i}]: {str(p)!r} is not readable (check its permissions)")
        groups.append(found)
    return groups


def check_data_reachable(cfg: DataConfig) -> None:
    """Pre-flight check (also used by ``moetrain launch``): every configured source resolves."""
    for src in data_sources(cfg):
        for i, group in enumerate(resolve_groups(src.cfg, src.field)):
            if src.cfg.format in SAMPLE_FORMATS and is_datasets_folder(Path(src.cfg.paths[i]).expanduser()):
                continue
            for p in group:
                if src.cfg.format in SAMPLE_FORMATS and format_of(p, src.cfg) is None:
                    raise UserError(
                        f"{src.field}.paths[{i}]: {str(p)!r} is not a JSON Lines file (.jsonl / .json); "
                        f"{src.field}.format {src.cfg.format!r} reads records from JSON Lines files or a datasets folder"
                    )
                if format_of(p, src.cfg) is None:
                    raise UserError(
                        f"{src.field}.format: cannot tell the format of {str(p)!r}; set {src.field}.format to "
                        "text, jsonl or parquet"
                    )


def check_contents(cfg: DataConfig, groups: list[list[Path]], field: str = "data") -> None:
    """Before preparation writes anything: no ``paths`` entry (a group of ``resolve_groups``) of a
    one-source config is only empty files, and every text / jsonl file is UTF-8 text (not binary). One
    pass over the bytes."""
    for i, group in enumerate(groups):
        if cfg.paths and all(p.stat().st_size == 0 for p in group):
            what = "it is empty" if len(group) == 1 else f"all {len(group)} files it matches are empty"
            raise UserError(f"{field}.paths[{i}]: {cfg.paths[i]!r} holds no text ({what}); add text or remove it")
        for p in group:
            if format_of(p, cfg) in ("text", "jsonl", *SAMPLE_FORMATS):
                check_utf8(p)


def check_all_contents(cfg: DataConfig) -> None:
    """``check_contents`` of every source of ``cfg``."""
    for src in data_sources(cfg):
        check_contents(src.cfg, resolve_groups(src.cfg, src.field), src.field)


def format_of(path: Path, cfg: DataConfig) -> str | None:
    if cfg.format in SAMPLE_FORMATS:  # records: JSON Lines files (a datasets folder is resolved whole)
        return cfg.format if path.suffix.lower() in EXTENSIONS["jsonl"] else None
    if cfg.format != "auto":
        return cfg.format
    for fmt, exts in EXTENSIONS.items():
        if path.suffix.lower() in exts:
            return fmt
    return None


def check_utf8(path: Path) -> None:
    """Raise UserError naming ``path`` and the offset of its first byte that is not UTF-8, or of its
    first NUL byte (a binary file that happens to decode)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_BYTES)
            pending = len(decoder.getstate()[0])  # the start of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise UserError(
                    f"data file {str(path)!r} is not UTF-8 text: byte {at} is 0x{exc.object[exc.start]:02x}; "
                    "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from data.paths"
                ) from None
            if (nul := chunk.find(b"\0")) >= 0:
                raise UserError(
                    f"data file {str(path)!r} looks binary, not text: byte {offset + nul} is 0x00; "
                    "remove it from data.paths (or point data.paths at the text files only)"
                )
            if not chunk:
                return
            offset += len(chunk)


# --- documents ----------------------------------------------------------------------------------------


@dataclass
class DocumentStream:
    """Documents of the configured sources, each as an iterator of text chunks (a large text file is
    never one string). ``bytes_read`` counts the source bytes consumed so far."""

    cfg: DataConfig
    files: list[Path]
    bytes_read: int = field(default=0)

    def __iter__(self) -> Iterator[Iterator[str]]:
        if self.cfg.hub is not None and not self.files:
            yield from self._hub()
            return
        for p in self.files:
            fmt = format_of(p, self.cfg) or "text"
            if fmt == "text":
                if p.stat().st_size:
                    yield self._text_chunks(p)
            elif fmt == "jsonl":
                yield from ([t] for t in self._jsonl(p))
            else:
                yield from ([t] for t in self._parquet(p))

    def _text_chunks(self, path: Path) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()  # checked by check_contents: never raises here
        with open(path, "rb") as f:
            while chunk := f.read(READ_BYTES):
                self.bytes_read += len(chunk)
                yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)

    def _jsonl(self, path: Path) -> Iterator[str]:
        name, seen_field = self.cfg.text_field, False
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                self.bytes_read += len(line)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"data file {str(path)!r} line {line_no} is not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"data file {str(path)!r} line {line_no} is not a JSON object")
                if name not in row:
                    if not seen_field:
                        raise UserError(
                            f"data.text_field: column {name!r} not found in {str(path)!r} "
                            f"(line {line_no} has: {sorted(row)})"
                        )
                    continue
                seen_field = True
                if isinstance(row[name], str) and row[name]:
                    yield row[name]

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.cfg.text_field not in pf.schema_arrow.names:
            raise UserError(
                f"data.text_field: column {self.cfg.text_field!r} not found in {str(path)!r} "
                f"(columns: {pf.schema_arrow.names})"
            )
        for batch in pf.iter_batches(batch_size=512, columns=[self.cfg.text_field]):
            texts = batch.column(0).to_pylist()
            self.bytes_read += sum(len(t) for t in texts if t)
            yield from (t for t in texts if t)

    def _hub(self) -> Iterator[Iterator[str]]:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(self.cfg.hub, split=self.cfg.hub_split, streaming=True)
        for row in ds:
            if self.cfg.text_field not in row:
                raise UserError(
                    f"data.text_field: column {self.cfg.text_field!r} not found in {self.cfg.hub!r} "
                    f"(columns: {sorted(row)})"
                )
            text = row[self.cfg.text_field]
            if text:
                self.bytes_read += len(text)
                yield iter([text])
