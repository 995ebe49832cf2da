"""Checkpoints of a training run: the collective save and the load into a DeepSpeed engine.

The format itself (files, keys, manifest, commit, pruning) is :mod:`moetrain.checkpoint`, which reads
and writes without DeepSpeed. What lives here needs the process group or the engine:

- :func:`choose_resume`: rank 0 picks the checkpoint (:func:`moetrain.checkpoint.folders.choose`) and
  broadcasts the choice, so every rank resumes from the same one;
- :func:`save`: every rank gathers what it writes (partitioned optimizer state is assembled over its
  groups by ``state_io``), writes its files into the temporary folder, and rank 0 commits it
  atomically, then prunes;
- :func:`load`: each rank reads only what it holds (its own experts) and puts values, Adam state,
  the LR schedule and the RNG into the engine, whatever layout saved them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moetrain.checkpoint import folders, rng
from moetrain.checkpoint.folders import (  # noqa: F401 - part of this module's API for the trainer
    ResumeChoice,
    checkpoint_dir,
    read_state,
    set_aside_history,
    set_aside_newer,
    step_folders,
)
from moetrain.checkpoint.initial import is_weights_only
from moetrain.checkpoint.manifest import file_entries
from moetrain.checkpoint.tensors import SHARED, ExpertIndex, experts_file, open_tensors, shared_entry, write_tensors
from moetrain.errors import UserError
from moetrain.moe.experts import GroupedExperts, is_expert_param
from moetrain.parallel.collectives import any_rank, barrier, broadcast_object, gather_objects
from moetrain.parallel.layout import ParallelLayout
from moetrain.training import state_io


def choose_resume(run_dir: Path, resume: str, layout: ParallelLayout) -> ResumeChoice:
    """The checkpoint to resume from (None: a fresh run), the same on every rank; raises UserError."""
    choice: ResumeChoice = broadcast_object(folders.choose(run_dir, resume) if layout.rank == 0 else None)
    if choice.error:
        raise UserError(choice.error)
    return choice


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
    nonfinite: torch.Tensor | None


def gather(model: nn.Module, optimizer, layout: ParallelLayout) -> Gathered:
    """Collective: every rank calls it (partitioned parameters are assembled over their groups)."""
    shared_writer, expert_writer = layout.rank == 0, layout.rank < layout.ep_size
    out = Gathered({}, {}, None)
    for name, _, entry in state_io.full_state(model, optimizer):
        bad = ~torch.isfinite(entry["value"]).all()  # on the value's device: no host sync per parameter
        out.nonfinite = bad if out.nonfinite is None else out.nonfinite | bad.to(out.nonfinite.device)
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
    engine,
    model: nn.Module,
    run_dir: Path,
    step: int,
    layout: ParallelLayout,
    run_state: dict,
    keep_last: int,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> Path:
    """Write the checkpoint of ``step`` and commit it atomically; then prune. Collective.

    ``on_phase("written")`` once this rank's files are written (before the commit), and on rank 0
    ``on_phase("committed")`` after the commit, before pruning (the callbacks' ``on_checkpoint``)."""
    final = checkpoint_dir(run_dir, step)
    tmp = folders.temp_dir(final)
    if layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before its commit
        (tmp / "rng").mkdir(parents=True)
    barrier()
    gathered = gather(model, engine.optimizer, layout)
    if any_rank(gathered.nonfinite if gathered.nonfinite is not None else torch.zeros((), dtype=torch.bool)):
        barrier()
        if layout.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise FloatingPointError(f"non-finite weights at step {step}: no checkpoint written (the last one is kept)")
    written = [tmp / "rng" / f"rank_{layout.rank:05d}.json"]
    written[0].write_text(json.dumps(rng.rng_state()))
    if layout.rank == 0:
        write_tensors(gathered.shared, tmp / SHARED)
        written.append(tmp / SHARED)
    if layout.rank < layout.ep_size:
        write_tensors(gathered.experts, tmp / experts_file(layout.ep_rank))
        written.append(tmp / experts_file(layout.ep_rank))
    # NOTE: each rank hashes what it wrote, all at once; rank 0 hashing every file while the others wait
    # in the next collective would put the collective timeout at risk for large checkpoints.
    hashed = gather_objects(file_entries(tmp, written))
    on_phase("written")
    barrier()
    if layout.rank == 0:
        folders.commit(
            tmp, final, {**run_state, **optimizer_state(engine)}, {k: v for h in hashed for k, v in h.items()}
        )
        on_phase("committed")
        folders.prune(run_dir, keep_last)
    barrier()
    return final


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


# --- load ------------------------------------------------------------------------------------------


@dataclass
class LocalState:
    """What one rank reads of a checkpoint: its parameters' entries (``value`` and, where saved, the Adam
    state) with only the experts it holds, the buffers, and the expert keys read (in order)."""

    tensors: dict[str, dict[str, torch.Tensor]]
    buffers: dict[str, torch.Tensor]
    expert_keys_read: list[str]


def read_local_state(model: nn.Module, folder: Path) -> LocalState:
    """Read what ``model`` (as parallelized on this rank) holds from ``folder``; local, no collective."""
    shared = open_tensors(folder / SHARED)
    experts = ExpertIndex(folder)
    shared_keys = set(shared.keys())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, _ in model.named_parameters():
        if is_expert_param(name):
            module = _expert_module(model, name)
            tensors[name] = experts.entry(name, range(module.first_expert, module.first_expert + module.num_local))
        else:
            tensors[name] = shared_entry(shared, shared_keys, name)
            if "value" not in tensors[name]:
                raise UserError(
                    f"checkpoint.resume: {folder} holds no parameter {name}; it was saved from another model"
                )
    buffers = {k[len("buffer/") :]: shared.get_tensor(k) for k in shared_keys if k.startswith("buffer/")}
    return LocalState(tensors, buffers, experts.read)


def load(engine, model: nn.Module, folder: Path, layout: ParallelLayout, state: dict) -> list[str]:
    """Restore parameters, Adam state, buffers, LR schedule and RNG from ``folder`` into this layout.
    Returns notes for the user. Local reads only (each rank takes what it holds).

    An initial (weights-only) checkpoint (:mod:`moetrain.checkpoint.initial`, an import's) sets the values
    and buffers only: the optimizer, the LR schedule and the random streams start as a fresh run's."""
    local = read_local_state(model, folder)
    model.load_state_dict(local.buffers, strict=False)  # buffers (router stage, hash table) through their hooks
    state_io.load_full_state(model, engine.optimizer, local.tensors)
    if is_weights_only(state):
        return [f"{folder} holds weights only: the optimizer, LR schedule and random streams start fresh"]
    _restore_optimizer_state(engine, state)
    return _restore_rng(folder, state, layout)


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


def _restore_rng(folder: Path, state: dict, layout: ParallelLayout) -> list[str]:
    path = folder / "rng" / f"rank_{layout.rank:05d}.json"
    if state["world_size"] == layout.world_size and path.is_file():
        rng.set_rng_state(json.loads(path.read_text()))
        return []
    rng.reseed(state["config"].get("seed", 0) * 1_000_003 + state["step"] * 8191 + layout.rank)
    return [
        f"note: world size {state['world_size']} -> {layout.world_size}: random streams (dropout) restart from a new seed"
    ]
