"""The manifest of a checkpoint folder: every file's size and sha256, and the commit marker.

A folder is loadable when ``COMMITTED`` exists and every file the manifest lists is present with its
size and (``full=True``) its sha256. The manifest detects accidents -- a killed save, a truncated or
corrupt file -- not tampering: what makes a tampered checkpoint harmless is that nothing in it is
unpickled (see ``checkpoint.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MARKER = "COMMITTED"
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: Path, paths: list[Path]) -> dict[str, dict]:
    """The manifest entries of ``paths`` (files under ``folder``): fsynced, then sized and hashed. Each
    rank of a save hashes the files it wrote, at the same time (``training/checkpoint.py``)."""
    out = {}
    for path in paths:
        _fsync(path)
        out[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return out


def write_manifest(folder: Path, fmt: int, hashed: dict[str, dict] | None = None) -> None:
    """Hash every file not already in ``hashed`` (fsynced), write the manifest, then the commit marker,
    each fsynced."""
    hashed = dict(hashed or {})
    rest = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MARKER, MANIFEST) and str(p.relative_to(folder)) not in hashed
    ]
    files = dict(sorted({**hashed, **file_entries(folder, rest)}.items()))
    (folder / MANIFEST).write_text(json.dumps({"format": fmt, "files": files}, indent=1))
    _fsync(folder / MANIFEST)
    (folder / MARKER).write_text("ok\n")
    _fsync(folder / MARKER)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def verify(folder: Path, fmt: int, full: bool = True) -> str | None:
    """None if ``folder`` is a complete checkpoint of format ``fmt``, else why it is not."""
    if not (folder / MARKER).is_file():
        return f"{folder} has no {MARKER} marker (the save was interrupted)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{folder}/{MANIFEST} is unreadable ({exc})"
    if isinstance(manifest, dict) and "sha256" in manifest and "format" not in manifest:
        return (
            f"{folder} was written by moetrain's first checkpoint format (DeepSpeed pickles), which cannot be "
            "loaded safely; resume from a newer checkpoint or start over"
        )
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        return f"{folder}/{MANIFEST} is malformed or of another format (expected format {fmt})"
    files = manifest.get("files")
    if not isinstance(files, dict) or "state.json" not in files:
        return f"{folder}/{MANIFEST} is malformed: it lists no files (or not state.json)"
    for rel, meta in files.items():
        path = folder / rel
        if not isinstance(meta, dict) or not {"bytes", "sha256"} <= set(meta):
            return f"{folder}/{MANIFEST} is malformed at {rel!r}"
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{folder}/{MANIFEST} names a file outside the checkpoint ({rel!r})"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if full and sha256_of(path) != meta["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupt)"
    return None
