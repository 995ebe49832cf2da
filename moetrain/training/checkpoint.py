"""Checkpoints: DeepSpeed's engine checkpoint plus moetrain's run state, made atomic by a marker.

Layout of ``<run_dir>/checkpoints/step_000100/``::

    ds/                     DeepSpeed engine checkpoint (module, optimizer, lr schedule, per rank)
    experts_00000.pt ...    expert weights of each EP rank, keyed by parameter name and global expert id
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
from typing import Any

import numpy as np
import torch

from moetrain.errors import UserError
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.layout import barrier

MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step_(\d+)$")


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
    candidates = (
        sorted((p for p in root.glob("step_*") if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:]), reverse=True)
        if root.is_dir()
        else []
    )
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            return folder
        log(f"warning: skipping checkpoint {folder.name}: {problem}")
    return None


def expert_tensors(model) -> dict[str, dict[int, torch.Tensor]]:
    """{parameter name: {global expert id: that expert's slice}} for this rank's local experts."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for mname, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = {module.first_expert + j: p[:, j] for j in range(module.num_local)}
    return out


def save(engine, model, folder: Path, layout, state: dict[str, Any], keep_last: int) -> None:
    """Every rank writes its parts, then rank 0 writes the manifest and the marker (last).

    NOTE: DeepSpeed's module file holds rank 0's copy of the model, so under expert parallelism it
    has only rank 0's experts. Each EP rank's experts are written by its first replica (ranks
    0..ep-1) to ``experts_<ep rank>.pt``, and restored from there on load.
    """
    rank = layout.rank
    if rank == 0:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(folder), tag="ds")
    if rank < layout.ep_size:
        experts = {k: {g: t.detach().cpu().clone() for g, t in v.items()} for k, v in expert_tensors(model).items()}
        torch.save(experts, folder / f"experts_{layout.ep_rank:05d}.pt")
    torch.save({"rng": rng_state(), "step": state["step"]}, folder / f"rank_{rank:05d}.pt")
    barrier()
    if rank == 0:
        (folder / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, "manifest.json"))
        manifest = {"sha256": {str(p.relative_to(folder)): _sha256(p) for p in files}}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (folder / MARKER).write_text("ok\n")
        _prune(folder.parent, keep_last)
    barrier()


def saved_experts(folder: Path) -> dict[str, dict[int, torch.Tensor]]:
    """Every saved expert slice of a checkpoint, merged over the EP ranks' files."""
    merged: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(folder.glob("experts_*.pt")):
        for name, by_id in torch.load(f, weights_only=True).items():
            merged.setdefault(name, {}).update(by_id)
    return merged


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model with every global expert, whatever the EP layout it was saved with."""
    module = torch.load(folder / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name, by_id in saved_experts(folder).items():
        module[name] = torch.stack([by_id[g] for g in sorted(by_id)], dim=1)
    return module


def load(engine, model, folder: Path, layout) -> dict[str, Any]:
    """Restore engine, expert weights, RNG and run state; returns state.json."""
    rank = layout.rank
    state = json.loads((folder / "state.json").read_text())
    if state.get("expert_parallel_size", 1) != layout.ep_size or state.get("world_size") != layout.world_size:
        raise UserError(
            f"checkpoint.resume: {folder} was saved with world size {state.get('world_size')} and "
            f"moe.expert_parallel_size {state.get('expert_parallel_size')}; resume with the same layout "
            f"(now world size {layout.world_size}, expert_parallel_size {layout.ep_size})"
        )
    load_path, _ = engine.load_checkpoint(
        str(folder), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True, load_module_strict=False
    )
    if load_path is None:
        raise UserError(f"checkpoint.resume: DeepSpeed could not load {folder}/ds")
    saved = saved_experts(folder)
    with torch.no_grad():
        for name, by_id in expert_tensors(model).items():
            for g, dst in by_id.items():
                if g not in saved.get(name, {}):
                    raise UserError(f"checkpoint.resume: {folder} holds no weights for expert {g} of {name}")
                dst.copy_(saved[name][g])
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
