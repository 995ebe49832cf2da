"""Turn pydantic validation errors into messages that name the field path, the value and the fix."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from moetrain.config.job import JobConfig


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
