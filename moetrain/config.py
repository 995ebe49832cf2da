"""The typed job-config tree: YAML + ``a.b=value`` overrides -> validated :class:`JobConfig`.

Each component owns its config model next to its code (``model.py``, ``moe/layer.py``, ``data.py``,
...); this module nests them, loads YAML, applies overrides and turns every validation problem into
one :class:`~moetrain.errors.UserError` that names the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from moetrain.checkpoint import CheckpointConfig
from moetrain.data import DataConfig
from moetrain.errors import UserError
from moetrain.launch.config import LaunchConfig
from moetrain.logging import LoggingConfig
from moetrain.model import ModelConfig
from moetrain.moe.layer import MoEConfig
from moetrain.parallel.deepspeed_compat import check_deepspeed_block
from moetrain.schema import StrictModel
from moetrain.trainer import OptimConfig, TrainConfig


class JobConfig(StrictModel):
    """One training job. ``moe: null`` gives the dense baseline."""

    name: str = "moetrain"
    run_dir: str | None = Field(None, description="defaults to runs/<name>")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    moe: MoEConfig | None = MoEConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    launch: LaunchConfig = Field(LaunchConfig(), description="how `moetrain launch` starts the job (docs/launching.md)")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="passed to DeepSpeed verbatim (moetrain fills batch, precision, clipping)"
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        m = self.model
        if self.data.seq_len > m.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})"
            )
        if self.moe is not None:
            self.moe.check_against_model(m.n_layers)
        check_deepspeed_block(self)
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def check_world_size(self, world_size: int) -> None:
        """Check the parallel layout for ``world_size`` ranks (``moetrain validate --world-size``)."""
        from moetrain.parallel.layout import ParallelLayout

        ParallelLayout.check(world_size, self.ep_size)

    @property
    def ep_size(self) -> int:
        return self.moe.expert_parallel_size if self.moe is not None else 1


# --- loading ---------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "--c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key.path=value (e.g. train.steps=100)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise UserError(f"override {item!r}: value {raw!r} is not valid YAML ({exc.problem})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "deepspeed":
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping at the top, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read YAML (or start from defaults), apply overrides, validate; raise UserError on any problem."""
    raw = read_yaml(path) if path is not None else {}
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    return validate_dict(raw)


def validate_dict(raw: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, raw)) from None


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML (what is written into the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --- error messages --------------------------------------------------------------------------------


def format_validation_error(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = [_format_one(err) for err in exc.errors()]
    head = "invalid config" if len(lines) == 1 else f"invalid config ({len(lines)} problems)"
    return head + ":\n" + "\n".join(f"  - {line}" for line in lines)


def _format_one(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = _field_path(loc)
    value = err.get("input")
    etype = err["type"]
    if etype == "extra_forbidden":
        path = _field_path(loc[:-1])
        parent_fields = _fields_at(loc[:-1])
        hint = ""
        matches = difflib.get_close_matches(str(loc[-1]), parent_fields, n=1, cutoff=0.6)
        if matches:
            hint = f"; did you mean {matches[0]!r}?"
        allowed = f" (allowed: {', '.join(parent_fields)})" if parent_fields else ""
        return f"{path}: unknown key {str(loc[-1])!r}{hint}{allowed}"
    if etype == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"{path}.{ctx.get('discriminator', 'kind').strip(chr(39))}: {ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
    if etype == "union_tag_not_found":
        return f"{path}: missing 'kind' (one of the router kinds)"
    msg = err["msg"].removeprefix("Value error, ")
    if etype == "value_error" and not loc:
        return msg
    if etype == "value_error":
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {value!r})"


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the config models.

    Returns the printable path (discriminator tags such as the 'topk' in moe.router.topk.top_k are
    dropped) and the model type found at the end (None for a leaf or an unknown key).
    """
    parts: list[str] = []
    model: Any = JobConfig
    for part in loc:
        members = model if isinstance(model, list) else [model]
        tagged = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields]
        member = next((m for m in tagged if part in typing.get_args(m.model_fields["kind"].annotation)), None)
        if member is not None:  # a tagged-union tag (e.g. the 'topk' of moe.router.topk.top_k): skip it
            model = member
            continue
        if isinstance(model, list):
            model = None
        parts.append(str(part))
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = _unwrap(model.model_fields[part].annotation)
        else:
            model = None
    return parts, model


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(_walk(loc)[0]) or "<top level>"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model = _walk(loc)[1]
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """A BaseModel type, a list of tagged-union members, or None for leaves."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(args[0])
    members = [m for a in args for m in ([_unwrap(a)] if _unwrap(a) is not None else [])]
    flat = [m for m in members if not isinstance(m, list)] + [x for m in members if isinstance(m, list) for x in m]
    if len(flat) == 1:
        return flat[0]
    return flat or None
