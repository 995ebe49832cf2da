"""Render the config reference (docs/config.md) from the config models.

    python -m moetrain.config.reference > docs/config.md

A test checks that docs/config.md equals this output, so the reference never drifts from the code.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from moetrain.config.job import JobConfig

HEADER = """# Config reference

Generated from the config models by `python -m moetrain.config.reference > docs/config.md` (a test keeps
it in sync). A job config is one YAML file; every field can be overridden on the command line as
`key.path=value`. Unknown keys are errors. `moe.router` is chosen by its `kind`; each kind has its
own fields, listed in its own table.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def _render(model: type[BaseModel], prefix: str, out: list[str], title: str) -> None:
    rows, children = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        subs = _models(field.annotation)
        rows.append(
            f"| `{path}` | {_type_name(field.annotation) if not subs else 'section'} | {_default(field)} | "
            f"{(field.description or '').replace('|', '/')} |"
        )
        for sub in subs:
            kind = sub.model_fields.get("kind")
            label = f"{path} (kind: {kind.default})" if kind is not None else path
            children.append((sub, f"{path}.", label))
    out += [f"## {title}", "", "| field | type | default | description |", "|---|---|---|---|", *rows, ""]
    for sub, sub_prefix, label in children:
        _render(sub, sub_prefix, out, f"`{label}`")


def render_reference() -> str:
    out = [HEADER]
    _render(JobConfig, "", out, "top level")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
