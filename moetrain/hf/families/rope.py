"""A ``config.json``'s rotary positions as moetrain fields (``model.rope_theta``, ``model.rope_scaling``).

Every family calls :func:`rope_fields`. It reads both forms ``transformers`` accepts: version 5's
``rope_parameters`` (``{"rope_type": ..., "rope_theta": ..., ...}``) and the older top-level ``rope_theta``
with ``rope_scaling`` (``{"type" or "rope_type": ..., ...}``), and fills what transformers fills
(``standardize_rope_params``): ``rope_theta`` 10000, ``original_max_position_embeddings`` from the
top-level field or ``max_position_embeddings``. Kinds moetrain does not compute exactly are refused
(:class:`UnsupportedConfigError`), never approximated. :func:`hf_rope_parameters` is the inverse, for
export.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from moetrain.config.rope import RopeScaling
from moetrain.hf.families.base import UnsupportedConfigError

DEFAULT_THETA = 10000.0
SUPPORTED = ("default", "linear", "yarn", "llama3")

# moetrain's fields of each kind, besides ``kind`` (the same names as transformers' rope parameters)
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
REFUSED_WHY = {
    "dynamic": "transformers' dynamic NTK scaling recomputes its frequencies from the longest sequence its module "
    "has seen since the last reset (and its KV cache keeps keys rotated with earlier frequencies), state that "
    "no function of the positions reproduces",
    "longrope": "LongRoPE's per-dimension factors are not implemented",
    "proportional": "proportional rotary scaling is not implemented",
}


def _rope_dict(hf_config: dict, default_theta: float) -> tuple[str, dict[str, Any]]:
    """(the field it came from, the rope parameters as one flat dict)."""
    field = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
    params = hf_config.get(field)
    if params is not None and not isinstance(params, dict):
        raise UnsupportedConfigError(field, params, "must be a mapping of rotary parameters (or null)")
    params = dict(params or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfigError(
            field, params, "rotary parameters per attention-layer type are not supported; moetrain has one rotary"
        )
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf_config.get("rope_theta", default_theta))
    return field, params


def rope_fields(hf_config: dict, default_theta: float = DEFAULT_THETA) -> dict[str, Any]:
    """``{"rope_theta": float, "rope_scaling": dict | None}`` for moetrain's ``model`` section.

    ``default_theta``: the family config class's ``default_theta``, taken when no ``rope_theta`` is given."""
    field, params = _rope_dict(hf_config, default_theta)
    kind = params["rope_type"]
    if kind not in SUPPORTED:
        why = REFUSED_WHY.get(kind, f"unknown rotary kind; moetrain computes {', '.join(SUPPORTED)}")
        raise UnsupportedConfigError(f"{field}.rope_type", kind, why)
    # a factor inside the rope parameters wins over a top-level one (transformers' setdefault)
    partial, where = params.get("partial_rotary_factor"), f"{field}.partial_rotary_factor"
    if partial is None:
        partial, where = hf_config.get("partial_rotary_factor"), "partial_rotary_factor"
    if partial is not None and partial != 1.0:
        raise UnsupportedConfigError(
            where, partial, "rotary positions on part of the head dims are not supported (1.0 only)"
        )
    theta = params["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise UnsupportedConfigError("rope_theta", theta, "must be a positive number")
    theta = float(theta)
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind != "yarn" and params.get("mscale_all_dim"):
        raise UnsupportedConfigError(
            f"{field}.mscale_all_dim", params["mscale_all_dim"], f"applies to yarn scaling only, not {kind}"
        )
    if kind in ("yarn", "llama3"):
        # transformers: a top-level original_max_position_embeddings wins, else max_position_embeddings
        original = hf_config.get("original_max_position_embeddings")
        if original is None:
            original = params.get("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
        params["original_max_position_embeddings"] = original
    if params.get("factor") is None:
        raise UnsupportedConfigError(f"{field}.factor", None, f"{kind} scaling needs a factor")
    scaling = {"kind": kind}
    for name in KIND_FIELDS[kind]:
        if params.get(name) is not None:
            scaling[name] = params[name]
    if kind == "yarn":
        # transformers reads beta_fast/beta_slow with `or` (0 or missing -> 32 / 1)
        scaling["beta_fast"] = float(params.get("beta_fast") or 32)
        scaling["beta_slow"] = float(params.get("beta_slow") or 1)
        scaling["truncate"] = bool(params.get("truncate", True))
    for key in KIND_FIELDS[kind] if kind != "yarn" else ("original_max_position_embeddings",):
        if params.get(key) is None:
            raise UnsupportedConfigError(f"{field}.{key}", None, f"{kind} scaling needs it")
    return {"rope_theta": theta, "rope_scaling": scaling}


def hf_rope_parameters(model: dict) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` for moetrain's ``model`` section (export)."""
    scaling = model.get("rope_scaling")
    params: dict[str, Any] = {"rope_type": "default" if scaling is None else scaling["kind"]}
    params["rope_theta"] = model["rope_theta"]
    for name, value in (scaling or {}).items():
        if name != "kind" and value is not None:
            params[name] = value
    return params


def reads_as(hf_config: dict, model: dict, default_theta: float = DEFAULT_THETA) -> bool:
    """Whether ``hf_config``'s own rope fields read as the rotary positions of moetrain's ``model`` section
    (a dict): then export writes the file's fields back as they were, not :func:`hf_rope_parameters`."""
    if not any(k in hf_config for k in ("rope_parameters", "rope_scaling", "rope_theta")):
        return False
    try:
        fields = rope_fields({"max_position_embeddings": model["max_seq_len"], **hf_config}, default_theta)
        scaling = TypeAdapter(RopeScaling | None)
        same = scaling.validate_python(fields["rope_scaling"]) == scaling.validate_python(model.get("rope_scaling"))
    except (UnsupportedConfigError, ValueError):
        return False
    return same and fields["rope_theta"] == model["rope_theta"]
