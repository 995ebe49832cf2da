"""What code outside the package adds to the config at run time (the config's top: it rebuilds the
models that nest what it adds)."""

from __future__ import annotations

import typing

from pydantic.fields import FieldInfo

from moetrain.config import job, model
from moetrain.config.routers import ROUTER_CONFIGS, router_config_union
from moetrain.config.schema import StrictModel


def register_router_config(config: type[StrictModel]) -> None:
    """Accept ``moe.router: {kind: <config's kind>, ...}`` from now on (in this process).

    ``config`` is a ``StrictModel`` with a ``kind: Literal["name"]`` field whose name no router uses
    yet. The job config's models are rebuilt with the larger union, so validation, error messages and
    ``model_dump`` treat the new kind like a built-in one."""
    kind = config.model_fields.get("kind")
    names = typing.get_args(kind.annotation) if kind is not None else ()
    if len(names) != 1:
        raise TypeError(f"{config.__name__} needs a field kind: Literal['<name>'] with one name")
    taken = {typing.get_args(c.model_fields["kind"].annotation)[0]: c for c in ROUTER_CONFIGS}
    if names[0] in taken and taken[names[0]] is not config:
        raise ValueError(f"router kind {names[0]!r} is taken by {taken[names[0]].__name__}")
    if config in ROUTER_CONFIGS:
        return
    ROUTER_CONFIGS.append(config)
    field = model.MoEConfig.model_fields["router"]
    model.MoEConfig.model_fields["router"] = FieldInfo.from_annotated_attribute(
        router_config_union(ROUTER_CONFIGS), field.default
    )
    model.MoEConfig.model_rebuild(force=True)
    job.JobConfig.model_rebuild(force=True)
