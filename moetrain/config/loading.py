"""YAML + ``a.b=value`` overrides -> a validated :class:`~moetrain.config.job.JobConfig`.

Every validation problem becomes one :class:`~moetrain.errors.UserError` that names the field path,
the bad value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moetrain.config.job import JobConfig
from moetrain.config.messages import format_validation_error
from moetrain.errors import UserError


class YamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2 booleans: only true / false are booleans.

    YAML 1.1 also reads on / off / yes / no as booleans, which turns documented enum values such as
    ``logging.progress: off`` into False. Here they stay strings; a boolean field still accepts them
    (pydantic reads 'on', 'off', 'yes', 'no' as booleans).
    """


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


class _Path(dict):
    """A mapping made by a dotted override key (``moe.top_k=2`` makes ``moe`` one, remembering that
    override); a mapping given as a value (``moe={top_k: 2}``) stays a plain dict and replaces a null."""

    def __init__(self, origin: str = "") -> None:
        super().__init__()
        self.origin = origin


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "--c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key.path=value (e.g. train.steps=100)")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise UserError(f"override {item!r}: value {raw!r} is not valid YAML ({exc.problem})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, _Path(item))
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return tree


def _deep_merge(
    base: dict[str, Any], update: dict[str, Any], source: str = "the config", at: str = ""
) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, _Path) and key in out and out[key] is None:
            _refuse_override_into_null(f"{at}{key}", value, source)
        if _other_kind(value, out.get(key)):  # e.g. moe.router={kind: hash}: the old kind's keys do not apply
            out[key] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "deepspeed":
            out[key] = _deep_merge(out[key], value, source, f"{at}{key}.")
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _other_kind(value: Any, base: Any) -> bool:
    """A whole mapping (``key={kind: ...}``, not a dotted path) that names another ``kind`` than ``base``:
    it replaces the section instead of merging into it."""
    return (
        isinstance(value, dict)
        and not isinstance(value, _Path)
        and isinstance(base, dict)
        and "kind" in value
        and value["kind"] != base.get("kind")
    )


def _refuse_override_into_null(section: str, value: _Path, source: str) -> None:
    """``moe.top_k=2`` on a file with ``moe: null`` would otherwise silently build a default section."""
    whole = yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
    raise UserError(
        f"override {value.origin!r} changes a key of {section!r}, but {source} sets {section} to null; "
        f"to enable {section}, make it a mapping in the file, or override the whole section "
        f"(quoted for the shell): '{section}={whole}' ('{section}={{}}' gives its defaults)"
    )


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file {str(path)!r} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
            "give a YAML file, saved as UTF-8"
        ) from None
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
    source = f"config file {str(path)!r}" if path is not None else "the config"
    return config_from_dict(raw, overrides, source)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "the config") -> JobConfig:
    """A config given as a mapping (e.g. one ``moetrain import`` builds), with overrides applied as on a
    YAML file's; ``source`` names it in messages."""
    return validate_dict(_deep_merge(raw, parse_overrides(overrides or []), source))


def validate_dict(raw: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, raw)) from None


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML (what is written into the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
