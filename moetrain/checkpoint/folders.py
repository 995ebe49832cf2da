"""Checkpoint folders: names, which one to resume, committing, pruning (see ``moetrain.checkpoint``).

Lifecycle (every step of it survives a kill -9):

1. a save writes into ``checkpoints/.tmp_step_N``; :func:`commit` writes state.json, the manifest and
   ``COMMITTED``, then renames the folder to ``step_N`` -- a folder named ``step_N`` is complete or absent;
2. only then :func:`prune`: keep the newest ``keep_last`` checkpoints that verify, delete older ones and
   leftovers; the newest verified checkpoint is never deleted;
3. resume: :func:`choose` picks the newest checkpoint whose files match the manifest (sha256);
   checkpoints that exist but do not verify never let a run silently start over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrain.checkpoint.manifest import verify, write_manifest
from moetrain.errors import UserError

FORMAT = 2
STEP_DIR = re.compile(r"^step_(\d+)$")
HISTORY = ("checkpoints", "metrics.jsonl", "fluctuation", "fluctuation.json", "config.yaml")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def step_folders(run_dir: Path) -> list[Path]:
    """``step_N`` folders of a run, newest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "state.json").read_text())


@contextlib.contextmanager
def staged_in_place_of(target: Path, field_name: str, tag: str) -> Iterator[Path]:
    """A temporary folder beside ``target`` (absent or empty) to write into; renamed to ``target`` when the
    block ends without an error, so ``target`` is complete or absent (``moetrain import``, ``upcycle``,
    ``export``). Any failure removes the temporary folder; an ``OSError`` (a full disk, no permission)
    becomes one :class:`UserError` naming ``field_name`` (RUN_DIR, OUT_DIR)."""
    tmp = target.with_name(f".{target.name}.{tag}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if target.is_dir():
            target.rmdir()  # empty (the callers check before writing)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"{field_name}: cannot write {str(target)!r} ({exc.strerror or exc}); give a writable folder"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- choosing what to resume ------------------------------------------------------------------------


@dataclass
class ResumeChoice:
    folder: Path | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def choose(run_dir: Path, resume: str) -> ResumeChoice:
    """The checkpoint ``checkpoint.resume`` (``auto``, ``none`` or a path) names in ``run_dir``: a
    folder, a fresh run (no folder), or why neither (``error``)."""
    if resume == "none":
        return ResumeChoice()
    if resume != "auto":
        folder = Path(resume)
        if not folder.is_dir():
            return ResumeChoice(
                error=f"checkpoint.resume: {resume!r} is not a folder; give a step_NNNNNN folder, auto or none"
            )
        problem = verify(folder, FORMAT)
        if problem:
            return ResumeChoice(error=f"checkpoint.resume: cannot load {resume!r}: {problem}")
        return ResumeChoice(folder)
    notes, bad = [], []
    for folder in step_folders(run_dir):
        problem = verify(folder, FORMAT)
        if problem is None:
            return ResumeChoice(folder, notes=notes)
        notes.append(f"warning: skipping checkpoint {folder.name}: {problem}")
        bad.append(f"{folder.name} ({problem})")
    if bad:
        listing = "\n".join(f"  - {b}" for b in bad)
        return ResumeChoice(
            error=f"checkpoint.resume=auto: no checkpoint in {run_dir / 'checkpoints'} verifies:\n{listing}\n"
            "nothing was changed; fix or remove them, resume from a path, or start over with checkpoint.resume=none"
        )
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        return ResumeChoice(
            error=f"checkpoint.resume=auto: {run_dir} holds a run (metrics.jsonl) but no checkpoint to resume; "
            "start over with checkpoint.resume=none (the old files are kept in a previous_* folder) or use another run_dir"
        )
    return ResumeChoice()


# --- a run's history ---------------------------------------------------------------------------------


def set_aside_history(run_dir: Path) -> Path | None:
    """A fresh run (resume: none) in a run dir with history: move the old files into ``previous_<time>/``."""
    old = [run_dir / name for name in HISTORY if (run_dir / name).exists()]
    if not old:
        return None
    dest = run_dir / time.strftime("previous_%Y%m%d-%H%M%S")
    dest.mkdir()
    for path in old:
        os.replace(path, dest / path.name)
    return dest


def set_aside_newer(run_dir: Path, step: int) -> list[str]:
    """Checkpoint folders newer than the one resumed from (they failed verification): rename them
    ``.unverified_step_N`` so this run's saves never collide with them; pruning deletes them later."""
    moved = []
    for folder in step_folders(run_dir):
        if int(folder.name[5:]) > step:
            os.replace(folder, folder.with_name(f".unverified_{folder.name}_{int(time.time())}"))
            moved.append(folder.name)
    return moved


# --- commit and prune --------------------------------------------------------------------------------


def temp_dir(final: Path) -> Path:
    """Where a save of ``final`` writes before :func:`commit` renames it into place."""
    return final.with_name(f".tmp_{final.name}")


def commit(tmp: Path, final: Path, state: dict[str, Any], hashed: dict[str, dict] | None = None) -> None:
    """Write ``state.json``, the manifest and the commit marker into ``tmp`` (every file fsynced), then
    rename it to ``final``. ``hashed``: manifest entries of files already hashed (by the ranks that wrote
    them); the rest are hashed here. A committed folder already at ``final`` is moved aside, never
    overwritten."""
    (tmp / "state.json").write_text(json.dumps({**state, "format": FORMAT}, indent=1))
    write_manifest(tmp, FORMAT, hashed)
    if final.exists():
        os.replace(final, final.with_name(f".replaced_{final.name}_{int(time.time())}"))
    os.replace(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints that verify (files present, sizes right); delete older
    checkpoints, unverified folders older than the newest kept one, and leftovers of killed saves."""
    root = run_dir / "checkpoints"
    folders = step_folders(run_dir)
    verified = [f for f in folders if verify(f, FORMAT, full=False) is None]
    if not verified:
        return
    keep = set(verified[:keep_last])
    newest = int(verified[0].name[5:])
    for folder in folders:
        if folder not in keep and int(folder.name[5:]) < newest:
            shutil.rmtree(folder, ignore_errors=True)
    for leftover in root.glob(".*_step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
