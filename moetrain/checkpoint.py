"""Checkpoints: DeepSpeed's engine checkpoint plus moetrain's run state, made atomic by a marker.

Layout of ``<run_dir>/checkpoints/step_000100/``::

    ds/                     DeepSpeed engine checkpoint (module, optimizer, lr schedule, per rank)
    rank_00000.pt ...       moetrain state per rank: RNG states
    state.json              step, data fingerprint, world size, resolved config
    manifest.json           sha256 of every file above
    COMMITTED               written last, after every rank finished: a folder without it is never loaded
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field

from moetrain.errors import UserError
from moetrain.schema import StrictModel

MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointConfig(StrictModel):
    interval: int = Field(0, ge=0, description="save every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="committed checkpoints to keep")
    resume: Literal["auto", "none"] | str = Field(
        "auto", description="auto: the latest valid checkpoint in the run dir; none; or a checkpoint path"
    )
    save_at_end: bool = True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def verify(folder: Path) -> str | None:
    """None if ``folder`` is a complete checkpoint, else the reason it is not."""
    if not (folder / MARKER).is_file():
        return f"{folder} has no {MARKER} marker (the save was interrupted)"
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{folder}/manifest.json is unreadable ({exc})"
    for rel, digest in manifest["sha256"].items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if _sha256(path) != digest:
            return f"{path} does not match its sha256 in the manifest (corrupt or truncated)"
    return None


def find_resume(run_dir: Path, resume: str, log=print) -> Path | None:
    """The checkpoint to resume from; raises UserError for an explicit path that is not valid."""
    if resume == "none":
        return None
    if resume != "auto":
        folder = Path(resume)
        if not folder.is_dir():
            raise UserError(f"checkpoint.resume: {resume!r} is not a folder; give a step_XXXXXX folder, auto or none")
        problem = verify(folder)
        if problem:
            raise UserError(f"checkpoint.resume: cannot load {resume!r}: {problem}")
        return folder
    root = run_dir / "checkpoints"
    candidates = sorted(
        (p for p in root.glob("step_*") if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:]), reverse=True
    ) if root.is_dir() else []
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            return folder
        log(f"warning: skipping checkpoint {folder.name}: {problem}")
    return None


def save(engine, folder: Path, rank: int, state: dict[str, Any], keep_last: int) -> None:
    """Every rank writes its parts, then rank 0 writes the manifest and the marker (last)."""
    if rank == 0:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(folder), tag="ds")
    torch.save({"rng": rng_state(), "step": state["step"]}, folder / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        (folder / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, "manifest.json"))
        manifest = {"sha256": {str(p.relative_to(folder)): _sha256(p) for p in files}}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (folder / MARKER).write_text("ok\n")
        _prune(folder.parent, keep_last)
    _barrier()


def load(engine, folder: Path, rank: int) -> dict[str, Any]:
    """Restore engine, RNG and run state; returns state.json."""
    load_path, _ = engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"checkpoint.resume: DeepSpeed could not load {folder}/ds")
    state = json.loads((folder / "state.json").read_text())
    rank_file = folder / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise UserError(
            f"checkpoint.resume: {rank_file} is missing: the checkpoint was saved with world size "
            f"{state.get('world_size')}; resume with the same world size"
        )
    set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return state


def _prune(root: Path, keep_last: int) -> None:
    committed = sorted(
        (p for p in root.glob("step_*") if STEP_DIR.match(p.name) and (p / MARKER).is_file()),
        key=lambda p: int(p.name[5:]),
    )
    for old in committed[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
