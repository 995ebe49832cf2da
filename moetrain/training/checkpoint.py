"""Checkpoints that cannot lose the last good state, cannot execute code, and load in any layout.

Layout of ``<run_dir>/checkpoints/step_000100/`` (format 2)::

    shared.safetensors      rank 0: every non-expert parameter (fp32), its Adam state, the buffers
    experts_00000.safetensors ...   EP rank e's experts, one slice per *global* expert id (written by
                            the first replica of each EP rank); keys ``value|exp_avg|exp_avg_sq/<param>/<id>``
    rng/rank_00000.json ... each rank's RNG states
    state.json              step, tokens, layout, resolved config, data fingerprint, LR schedule and
                            optimizer-group hyperparameters, format version
    manifest.json           size and sha256 of every file above
    COMMITTED               written last

Nothing here is a pickle: tensors are safetensors, everything else JSON, so loading a checkpoint
cannot run code. Tensors are keyed by parameter name and global expert id, not by rank, so a
checkpoint resumes at another world size, expert-parallel size or ZeRO stage (``state_io``).

Lifecycle (every step of it survives a kill -9):

1. save into ``checkpoints/.tmp_step_N``; rank 0 writes state.json, the manifest and ``COMMITTED``,
   then renames the folder to ``step_N`` -- a folder named ``step_N`` is complete or absent;
2. only then prune: keep the newest ``keep_last`` checkpoints that verify, delete older ones and
   leftovers; the newest verified checkpoint is never deleted;
3. resume: rank 0 picks the newest checkpoint whose files match the manifest (sha256) and broadcasts
   the choice; checkpoints that exist but do not verify never let a run silently start over.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from moetrain.errors import UserError
from moetrain.moe.experts import GroupedExperts, is_expert_param
from moetrain.parallel.layout import ParallelLayout, any_rank, barrier
from moetrain.training import faults, state_io
from moetrain.training.manifest import verify, write_manifest

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


# --- choosing what to resume (rank 0 decides, every rank gets the same answer) ---------------------


@dataclass
class ResumeChoice:
    folder: Path | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def choose_resume(run_dir: Path, resume: str, layout: ParallelLayout) -> ResumeChoice:
    """The checkpoint to resume from (None: a fresh run), the same on every rank; raises UserError."""
    box = [_choose(run_dir, resume) if layout.rank == 0 else None]
    if dist.is_initialized() and layout.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    choice: ResumeChoice = box[0]
    if choice.error:
        raise UserError(choice.error)
    return choice


def _choose(run_dir: Path, resume: str) -> ResumeChoice:
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


# --- save ------------------------------------------------------------------------------------------


def _expert_module(model: nn.Module, name: str) -> GroupedExperts:
    return model.get_submodule(name.rsplit(".", 1)[0])


@dataclass
class Gathered:
    """This rank's share of a checkpoint: the tensors of ``shared.safetensors`` (rank 0) and of its
    ``experts_<ep rank>.safetensors`` (the first replica of each EP rank), and whether any of its
    parameters is not finite (a device flag: no host sync per parameter)."""

    shared: dict[str, torch.Tensor]
    experts: dict[str, torch.Tensor]
    nonfinite: torch.Tensor


def gather(model: nn.Module, optimizer, layout: ParallelLayout) -> Gathered:
    """Collective: every rank calls it (partitioned parameters are assembled over their groups)."""
    shared_writer, expert_writer = layout.rank == 0, layout.rank < layout.ep_size
    out = Gathered({}, {}, torch.zeros((), dtype=torch.bool))
    for name, _, entry in state_io.full_state(model, optimizer):
        out.nonfinite = out.nonfinite | ~torch.isfinite(entry["value"]).all().cpu()
        if is_expert_param(name):
            if expert_writer:
                first = _expert_module(model, name).first_expert
                for key, t in entry.items():
                    if key == "step":
                        out.experts[f"step/{name}"] = t.detach().float().reshape(()).cpu().clone()
                        continue
                    for j in range(t.shape[1]):
                        out.experts[f"{key}/{name}/{first + j}"] = t[:, j].detach().float().cpu().contiguous()
        elif shared_writer:
            for key, t in entry.items():
                out.shared[f"{key}/{name}"] = t.detach().float().cpu().clone()
    if shared_writer:
        for name, buf in model.named_buffers():
            out.shared[f"buffer/{name}"] = buf.detach().cpu().clone()
    return out


def save(
    engine, model: nn.Module, run_dir: Path, step: int, layout: ParallelLayout, run_state: dict, keep_last: int
) -> Path:
    """Write the checkpoint of ``step`` and commit it atomically; then prune. Collective."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before its commit
        (tmp / "rng").mkdir(parents=True)
    barrier()
    gathered = gather(model, engine.optimizer, layout)
    if any_rank(gathered.nonfinite):
        barrier()
        if layout.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise FloatingPointError(f"non-finite weights at step {step}: no checkpoint written (the last one is kept)")
    if layout.rank == 0:
        save_file(gathered.shared, tmp / "shared.safetensors")
    if layout.rank < layout.ep_size:
        save_file(gathered.experts, tmp / f"experts_{layout.ep_rank:05d}.safetensors")
    (tmp / "rng" / f"rank_{layout.rank:05d}.json").write_text(json.dumps(rng_state()))
    faults.kill_if("kill_mid_save", step, layout.rank)
    barrier()
    if layout.rank == 0:
        state = {**run_state, "format": FORMAT, **optimizer_state(engine)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp, FORMAT)
        if final.exists():  # never overwrite a committed folder: move it aside, prune removes it later
            os.replace(final, final.with_name(f".replaced_{final.name}_{int(time.time())}"))
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        faults.kill_if("kill_after_commit", step, layout.rank)
        prune(run_dir, keep_last)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_state(engine) -> dict[str, Any]:
    """The non-tensor optimizer state: LR schedule, group hyperparameters, DeepSpeed's step counters."""
    groups = [
        {"name": g.get("name"), "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in engine.optimizer.param_groups
    ]
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    if sched is not None:
        sched = {k: v for k, v in sched.items() if k != "lr_lambdas"}
    counters = {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
    }
    return {"param_groups": groups, "lr_scheduler": sched, "engine": counters}


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


# --- load ------------------------------------------------------------------------------------------


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "state.json").read_text())


def load(engine, model: nn.Module, folder: Path, layout: ParallelLayout, state: dict) -> list[str]:
    """Restore parameters, Adam state, buffers, LR schedule and RNG from ``folder`` into this layout.
    Returns notes for the user. Local reads only (each rank takes what it holds)."""
    shared = _open(folder / "shared.safetensors")
    experts = _ExpertIndex(sorted(folder.glob("experts_*.safetensors")))
    shared_keys = set(shared.keys())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, _ in model.named_parameters():
        if is_expert_param(name):
            module = _expert_module(model, name)
            ids = range(module.first_expert, module.first_expert + module.num_local)
            tensors[name] = experts.entry(name, ids)
        else:
            entry = {
                key: shared.get_tensor(f"{key}/{name}")
                for key in ("value", "exp_avg", "exp_avg_sq", "step")
                if f"{key}/{name}" in shared_keys
            }
            if "value" not in entry:
                raise UserError(
                    f"checkpoint.resume: {folder} holds no parameter {name}; it was saved from another model"
                )
            tensors[name] = entry
    buffers = {k[len("buffer/") :]: shared.get_tensor(k) for k in shared_keys if k.startswith("buffer/")}
    model.load_state_dict(buffers, strict=False)  # buffers (router stage, hash table) through their hooks
    state_io.load_full_state(model, engine.optimizer, tensors)
    _restore_optimizer_state(engine, state)
    return _restore_rng(folder, state, layout)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"checkpoint.resume: {path} is not a readable safetensors file ({exc})") from None


class _ExpertIndex:
    """Every expert slice of a checkpoint, whichever EP rank's file holds it."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, Any] = {}
        for f in files:
            handle = _open(f)
            self.where.update({k: handle for k in handle.keys()})

    def entry(self, name: str, ids: range) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("value", "exp_avg", "exp_avg_sq"):
            wanted = [f"{key}/{name}/{g}" for g in ids]
            have = [k in self.where for k in wanted]
            if not any(have) and key != "value":
                continue
            if not all(have):
                missing = wanted[have.index(False)]
                raise UserError(f"checkpoint.resume: the checkpoint holds no {missing} (saved with fewer experts?)")
            out[key] = torch.stack([self.where[k].get_tensor(k) for k in wanted], dim=1)
        if f"step/{name}" in self.where:
            out["step"] = self.where[f"step/{name}"].get_tensor(f"step/{name}")
        return out


def _restore_optimizer_state(engine, state: dict) -> None:
    groups = engine.optimizer.param_groups
    saved = state["param_groups"]
    if len(saved) != len(groups):
        raise UserError(f"checkpoint.resume: {len(saved)} optimizer groups saved, {len(groups)} now: another model")
    for group, old in zip(groups, saved):
        group["lr"], group["weight_decay"] = old["lr"], old["weight_decay"]
    if engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict({**state["lr_scheduler"], "lr_lambdas": [None] * len(groups)})
    counters = state.get("engine", {})
    engine.global_steps = counters.get("global_steps", state["step"])
    engine.global_samples = counters.get("global_samples", 0)
    engine.skipped_steps = counters.get("skipped_steps", 0)


# --- RNG -------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _restore_rng(folder: Path, state: dict, layout: ParallelLayout) -> list[str]:
    path = folder / "rng" / f"rank_{layout.rank:05d}.json"
    if state["world_size"] == layout.world_size and path.is_file():
        set_rng_state(json.loads(path.read_text()))
        return []
    seed = state["config"].get("seed", 0) * 1_000_003 + state["step"] * 8191 + layout.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return [
        f"note: world size {state['world_size']} -> {layout.world_size}: random streams (dropout) restart from a new seed"
    ]


# --- export ----------------------------------------------------------------------------------------


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model, every global expert stacked in order, whatever layout saved it (fp32)."""
    shared = _open(folder / "shared.safetensors")
    out = {k[len("value/") :]: shared.get_tensor(k) for k in shared.keys() if k.startswith("value/")}
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(folder.glob("experts_*.safetensors")):
        handle = _open(f)
        for key in handle.keys():
            if key.startswith("value/"):
                _, name, g = key.split("/")
                slices.setdefault(name, {})[int(g)] = handle.get_tensor(key)
    for name, by_id in slices.items():
        out[name] = torch.stack([by_id[g] for g in sorted(by_id)], dim=1)
    return out
