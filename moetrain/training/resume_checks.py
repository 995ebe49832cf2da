"""What may differ between the job that saved a checkpoint and the job that resumes it.

Differences that change the model, the parameter groups, the optimizer's hyperparameters or the data
are refused (the checkpoint would be loaded into something else, or its restored state would
silently override the new value). Everything below is allowed: extending or shortening a run,
evaluation, logging, checkpointing and launch settings, and the parallel layout (checkpoints are
resharded on load) as long as the global batch stays the same.

A field the saved config does not have (it was added after the checkpoint was written) is no
difference when the resuming job leaves it at its default: a checkpoint of an older release resumes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from moetrain.errors import UserError

ALLOWED = (
    "name",
    "run_dir",
    "train.steps",
    "train.stop_at_step",
    "train.eval_interval",
    "train.eval_batches",
    "train.nonfinite",
    "train.nonfinite_max_skips",
    "train.deterministic",
    "train.collective_timeout_s",
    "train.activation_checkpointing",  # the same numbers (tested bitwise), other memory/speed
    "train.compile",
    "train.retain_host_memory",
    "train.cpu_kernel_cache",
    "optim.fused",  # the same update up to rounding; checkpoints hold no optimizer options
    "train.micro_batch_size",  # with grad_accum_steps and the world size: the global batch is checked
    "train.grad_accum_steps",
    "logging",
    "checkpoint",
    "launch",
    "data.cache_dir",
    "data.paths",  # where the corpus is: the tokens' content is compared instead (the data fingerprint)
    "moe.kernels",
    "moe.expert_parallel_size",
    "moe.ep_overlap",  # the same computation in another order
    "moe.fluctuation",
    "deepspeed.zero_optimization",
    "train.zero_on_one_process",  # which DeepSpeed path runs the same update
)


# Fields of the model and moe sections that change neither the weights nor what the model computes at a
# given step (dropout and the routers' training losses and bias updates act only while training): a job
# starting from an initial (weights-only) checkpoint may set them, and ``moetrain import`` takes them as
# overrides. On a resume with optimizer state they stay refused above: the restored state was made with them.
TRAINING_ONLY = (
    "model.dropout",
    "moe.router.load_balance_coeff",
    "moe.router.z_loss_coeff",
    "moe.router.seq_aux_coeff",
    "moe.router.bias_update_rate",
    "moe.router.trainable",  # which parameters the optimizer steps, not their values
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a null section stays one entry)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _allowed(path: str, allowed: tuple[str, ...] = ALLOWED) -> bool:
    return any(path == a or path.startswith(a + ".") for a in allowed)


def config_differences(
    saved: dict, current: dict, current_model: BaseModel | None = None, saved_resolved: dict | None = None
) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences as ``"path: old -> new"`` lines. ``current_model``: the validated
    config ``current`` dumps, to look up the defaults of fields that ``saved`` lacks; ``saved_resolved``:
    the saved config as this release resolves it (:func:`resolved_saved_config`), for fields whose value
    follows from others."""
    old, new = flatten(saved), flatten(current)
    resolved = flatten(saved_resolved) if saved_resolved is not None else {}
    refused, allowed = [], []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path, "<unset>"), new.get(path, "<unset>")
        if a == "<unset>" and current_model is not None and _is_default(current_model, path, b):
            continue  # a field newer than the checkpoint, left at its default
        if a == "<unset>" and path in resolved and resolved[path] == b:
            continue  # a newer field whose value follows from the saved ones (the arch's norm and biases)
        if a != b:
            (allowed if _allowed(path) else refused).append(f"{path}: {a!r} -> {b!r}")
    return refused, allowed


def _is_default(model: BaseModel, path: str, value: Any) -> bool:
    """Whether ``value`` (JSON form) is the default of the field at ``path`` of ``model``."""
    *parents, name = path.split(".")
    for part in parents:
        model = getattr(model, part, None)
        if not isinstance(model, BaseModel):
            return False
    field = type(model).model_fields.get(name)
    if field is None:
        return False
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    return default is not PydanticUndefined and flatten(default) == flatten(value)


def global_batch(cfg: dict, world_size: int) -> int:
    return cfg["train"]["micro_batch_size"] * cfg["train"]["grad_accum_steps"] * world_size


def resolved_saved_config(saved: dict, current_model: BaseModel) -> dict:
    """The saved config as this release reads it: fields it lacks take their defaults, and values that
    follow from others (the backbone's norm, biases and FFN from ``model.arch``) are resolved as they were
    when it was written. A config this release cannot read any more is compared as saved."""
    try:
        return type(current_model).model_validate(saved).model_dump(mode="json")
    except (ValueError, UserError):
        return saved


def _sources_without_paths(cfg: dict) -> tuple[dict, list]:
    """``cfg`` with the paths of each ``data.sources`` entry set apart (where the corpus is may change: its
    tokens are compared by content), and those paths."""
    sources = (cfg.get("data") or {}).get("sources")
    if not isinstance(sources, list):
        return cfg, []
    stripped = [{k: v for k, v in src.items() if k != "paths"} if isinstance(src, dict) else src for src in sources]
    paths = [src.get("paths") if isinstance(src, dict) else None for src in sources]
    return {**cfg, "data": {**cfg["data"], "sources": stripped}}, paths


def check_resume(folder, state: dict, current_model: BaseModel, world_size: int) -> list[str]:
    """Raise UserError naming every refused difference; return the allowed ones (to be reported)."""
    saved, saved_paths = _sources_without_paths(state["config"])
    current, current_paths = _sources_without_paths(current_model.model_dump(mode="json"))
    refused, allowed = config_differences(
        saved, current, current_model, resolved_saved_config(state["config"], current_model)
    )
    if saved_paths != current_paths:
        allowed.append(f"data.sources paths: {saved_paths!r} -> {current_paths!r}")
    old_batch, new_batch = global_batch(saved, state["world_size"]), global_batch(current, world_size)
    if old_batch != new_batch:
        refused.append(
            f"global batch (micro_batch_size x grad_accum_steps x world size): {old_batch} -> {new_batch}; "
            f"keep it at {old_batch}, e.g. train.micro_batch_size={old_batch // world_size} on {world_size} ranks"
        )
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise UserError(
            f"checkpoint.resume: {folder} was saved by a different job; these differences are not allowed:\n"
            f"{lines}\nrestore them, or start a new run (checkpoint.resume=none or another run_dir)"
        )
    return allowed


def model_differences(saved: dict, current: dict) -> list[str]:
    """``"path: old -> new"`` for every difference of the ``model`` and ``moe`` sections (JSON form) that
    changes the weights or what the model computes (:data:`TRAINING_ONLY` and the layout fields of
    :data:`ALLOWED` do not)."""
    old = flatten({k: saved.get(k) for k in ("model", "moe")})
    new = flatten({k: current.get(k) for k in ("model", "moe")})
    free = ALLOWED + TRAINING_ONLY
    return [
        f"{path}: {old.get(path, '<unset>')!r} -> {new.get(path, '<unset>')!r}"
        for path in sorted(set(old) | set(new))
        if old.get(path, "<unset>") != new.get(path, "<unset>") and not _allowed(path, free)
    ]


def check_initial(folder, state: dict, current_model: BaseModel) -> list[str]:
    """A job starting from an initial (weights-only) checkpoint (``moetrain.checkpoint.initial``): its model
    must be the saved one; the data, batch, optimizer and layout are the job's own (the checkpoint holds no
    state made with them). Raises UserError naming every difference; returns the training-only model fields
    the job changed (to be reported)."""
    saved = resolved_saved_config(state["config"], current_model)
    current = current_model.model_dump(mode="json")
    refused = model_differences(saved, current)
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise UserError(
            f"checkpoint.resume: {folder} holds the weights of another model (an import's or initial checkpoint); "
            f"these differences are not allowed:\n{lines}\nrestore them (the run's config.yaml has the model's "
            "values), or start a new run (checkpoint.resume=none or another run_dir)"
        )
    old, new = flatten(saved), flatten(current)
    return [
        f"{path}: {old.get(path)!r} -> {new.get(path)!r}"
        for path in sorted(set(old) | set(new))
        if _allowed(path, TRAINING_ONLY) and old.get(path) != new.get(path)
    ]
