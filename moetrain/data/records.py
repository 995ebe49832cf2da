"""Chat and prompt-completion records: where they are, checked before anything is written, read as a stream.

A record is one sample: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (``data.format: chat``) or
``{"prompt": ..., "completion": ...}`` (``data.format: prompt_completion``). They come from JSON Lines
files (one record per line; ``.jsonl`` / ``.json`` in a folder) or a ``datasets`` folder written by
``Dataset.save_to_disk`` (a ``DatasetDict`` folder: its ``data.hub_split`` split), read with
``datasets.load_from_disk`` (Arrow files and JSON: nothing in it runs code).

Every record carries where it came from, ``Where(source, row)``: the index of its file or folder in
``record_sources`` and its line (1-based, JSON Lines) or row (0-based, datasets), so every later
message can name it. Keys whose value is null are dropped before a template sees a message, as
transformers does (``content: null`` beside ``tool_calls`` in OpenAI-style data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moetrain.config.data import DataConfig
from moetrain.data.sources import is_datasets_folder, resolve_groups
from moetrain.errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Where:
    source: int  # index into record_sources()
    row: int  # JSON Lines: the line (1-based); datasets folder: the row (0-based)


@dataclass(frozen=True)
class RecordSource:
    path: Path
    kind: str  # "jsonl" or "datasets"

    def describe(self, row: int) -> str:
        if self.kind == "jsonl":
            return f"data file {str(self.path)!r} line {row}"
        return f"datasets folder {str(self.path)!r} row {row}"


def record_sources(cfg: DataConfig, groups: list[list[Path]]) -> list[RecordSource]:
    """The files and datasets folders of a one-source config, in ``data.paths`` order (``groups``: its
    ``resolve_groups``; a datasets folder's group is all of its files, for the fingerprint)."""
    out = []
    for pattern, group in zip(cfg.paths, groups):
        path = Path(pattern).expanduser()
        if is_datasets_folder(path):
            out.append(RecordSource(path, "datasets"))
        else:
            out.extend(RecordSource(p, "jsonl") for p in group)
    return out


class RecordStream:
    """Every record of ``sources`` in corpus order, as a dict, with where it came from (not yet checked);
    ``bytes_read`` counts the source bytes consumed so far (a datasets folder: its files' size)."""

    def __init__(self, cfg: DataConfig, sources: list[RecordSource]) -> None:
        self.cfg, self.sources, self.bytes_read = cfg, sources, 0

    def __iter__(self) -> Iterator[tuple[Where, dict]]:
        for i, src in enumerate(self.sources):
            rows = self._jsonl_rows(src.path) if src.kind == "jsonl" else self._datasets_rows(src.path)
            for row, record in rows:
                if not isinstance(record, dict):
                    raise UserError(f"{src.describe(row)}: a record must be a JSON object, not {type(record).__name__}")
                yield Where(i, row), record

    def _jsonl_rows(self, path: Path) -> Iterator[tuple[int, Any]]:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                self.bytes_read += len(line)
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                    raise UserError(
                        f"data file {str(path)!r} line {line_no} is not JSON ({msg}); fix or remove it"
                    ) from None

    def _datasets_rows(self, path: Path) -> Iterator[tuple[int, Any]]:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = self.cfg.hub_split
            if split not in loaded:
                raise UserError(
                    f"datasets folder {str(path)!r} holds the splits {sorted(loaded)}, not {split!r}; set "
                    "data.hub_split to the one to read"
                )
            loaded = loaded[split]
        self.bytes_read += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        yield from enumerate(loaded)


def checked_record(record: dict, fmt: str, where: str) -> dict:
    """The record as a template or the prompt-completion encoder reads it, or a UserError naming ``where``,
    the problem and the fix: for chat, ``messages`` is a non-empty list of {role, content} with a known
    role and string content and at least one assistant turn; for prompt_completion, two strings."""
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise UserError(
                    f"{where}: no {key!r} field (the record has {sorted(record)}); data.format: prompt_completion "
                    'needs {"prompt": "...", "completion": "..."}'
                )
            if not isinstance(record[key], str):
                raise UserError(f"{where}: {key!r} must be a string, not {type(record[key]).__name__}")
        if not record["completion"]:
            raise UserError(f"{where}: 'completion' is empty: the sample has nothing to learn; remove it")
        return record
    if "messages" not in record:
        raise UserError(
            f"{where}: no 'messages' field (the record has {sorted(record)}); data.format: chat needs "
            '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
        )
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: messages[{k}] must be an object with 'role' and 'content'")
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: messages[{k}] has the unknown role {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content", ""), str):
            raise UserError(
                f"{where}: messages[{k}].content must be a string, not {type(message['content']).__name__} "
                "(content given as a list of parts is not read)"
            )
        clean.append(message)
    if not any(m["role"] == "assistant" for m in clean):
        raise UserError(f"{where}: no assistant message: the loss counts assistant turns only; remove the record")
    return {"messages": clean}


def record_texts(cfg: DataConfig) -> Iterator[str]:
    """Each record's text (message contents, or prompt and completion, joined by a line break) of a
    one-source config: what a trained BPE learns from a chat source."""
    sources = record_sources(cfg, resolve_groups(cfg))
    for where, record in RecordStream(cfg, sources):
        rec = checked_record(record, cfg.format, sources[where.source].describe(where.row))
        if cfg.format == "chat":
            yield "\n".join(m.get("content", "") for m in rec["messages"])
        else:
            yield rec["prompt"] + "\n" + rec["completion"]
