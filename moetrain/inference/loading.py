"""Load a committed checkpoint onto one process (``moetrain eval | generate | export``).

Accepts a ``step_NNNNNN`` folder or a run directory (its newest checkpoint that verifies). Tensors come
from safetensors, everything else from JSON: loading never executes code. The experts are reassembled
by global id (:func:`moetrain.checkpoint.consolidated_state_dict`), so a checkpoint saved under
any world size or expert-parallel size loads here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrain.checkpoint import FORMAT, consolidated_state_dict, read_buffers, read_state, step_folders, verify
from moetrain.config import JobConfig, parse_overrides, validate_dict
from moetrain.errors import UserError
from moetrain.model import MoETransformer

INFERENCE_SECTIONS = ("name", "seed", "model", "moe", "data", "train")


@dataclass
class LoadedCheckpoint:
    folder: Path  # the step_NNNNNN folder
    run_dir: Path
    step: int
    state: dict[str, Any]  # state.json
    cfg: JobConfig  # the saved (resolved) job config with the user's overrides applied
    model: MoETransformer  # on the CPU, fp32, in eval mode


def find_checkpoint(path: str | Path, what: str = "CHECKPOINT_OR_RUN_DIR") -> Path:
    """The committed, verified checkpoint folder that ``path`` names (a step folder or a run dir)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what}: {str(path)!r} is not a folder; give a run directory or its checkpoints/step_NNNNNN")
    if (path / "state.json").is_file() or (path / "COMMITTED").is_file() or path.name.startswith("step_"):
        problem = verify(path, FORMAT)
        if problem:
            raise UserError(f"{what}: cannot load {str(path)!r}: {problem}")
        return path
    folders = step_folders(path)
    if not folders:
        raise UserError(
            f"{what}: {str(path)!r} holds no committed checkpoint (no checkpoints/step_NNNNNN folder); "
            "train with checkpoint.interval or checkpoint.save_at_end, or give a checkpoint folder"
        )
    problems = []
    for folder in folders:
        problem = verify(folder, FORMAT)
        if problem is None:
            return folder
        problems.append(f"  - {folder.name}: {problem}")
    raise UserError(
        f"{what}: no checkpoint in {str(path / 'checkpoints')!r} verifies:\n" + "\n".join(problems) + "\n"
        "give another run directory or checkpoint folder"
    )


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_checkpoint(path: str | Path, overrides: list[str] | None = None) -> LoadedCheckpoint:
    """1. find the checkpoint; 2. its config (+ overrides that do not change the model); 3. build the
    model on one process; 4. load every parameter and buffer (router stage, hash table)."""
    folder = find_checkpoint(path)
    state = read_state(folder)
    # NOTE: only the sections inference reads; launch, logging, checkpoint, optim and deepspeed settings
    # take their defaults, so a checkpoint stays loadable when those sections gain or lose keys.
    saved = {k: v for k, v in state["config"].items() if k in INFERENCE_SECTIONS}
    cfg = validate_dict(_merge(saved, parse_overrides(overrides or [])))
    if _weights_shape(cfg) != _weights_shape(validate_dict(saved)):
        raise UserError(
            "overrides change the saved model (model.* or moe.*); only settings that keep its weights and math "
            "may be overridden here (e.g. moe.router.eval_routing, moe.kernels, data.*, train.eval_batches)"
        )
    moe_cfg = cfg.moe.model_copy(update={"expert_parallel_size": 1}) if cfg.moe is not None else None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG alone
        model = MoETransformer(cfg.model, moe_cfg)
    weights = consolidated_state_dict(folder)
    buffers = read_buffers(folder)
    missing = [n for n, _ in model.named_parameters() if n not in weights]
    if missing:
        raise UserError(f"{folder}: holds no parameter {missing[0]}; it was saved from another model version")
    try:
        model.load_state_dict({**weights, **buffers}, strict=False)
    except RuntimeError as exc:  # a shape differs: the config does not describe these weights
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{folder}: its weights do not fit its saved config ({first})") from None
    model.eval()
    return LoadedCheckpoint(folder, folder.parent.parent, int(state["step"]), state, cfg, model)


def _weights_shape(cfg: JobConfig) -> tuple:
    """The config of the model and its MoE layers, without the settings an override may change."""
    moe = cfg.moe.model_dump(mode="json") if cfg.moe is not None else None
    if moe is not None:
        for key in ("kernels", "expert_parallel_size", "fluctuation"):
            moe.pop(key)
        moe["router"].pop("eval_routing", None)
    return cfg.model.model_dump(mode="json"), moe
