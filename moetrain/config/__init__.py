"""The typed job-config tree, and nothing that runs: pydantic models, YAML loading, validation.

Imports point one way: this package imports no torch and no other moetrain module but
``moetrain.errors``; the model, parallelism and training code import their configs from here.

- :mod:`.job`: :class:`JobConfig`, one training job, nesting the sections below;
- :mod:`.model` (backbone and MoE), :mod:`.routers` (one config per router kind), :mod:`.data`,
  :mod:`.training` (loop, optimizer, checkpoints, logging), :mod:`.launch`, :mod:`.deepspeed`;
- :mod:`.loading`: YAML + ``a.b=value`` overrides -> a validated config; :mod:`.messages`: errors
  that name the field, the value and the fix; :mod:`.reference`: renders docs/config.md.
"""

from moetrain.config.job import JobConfig, check_world_size
from moetrain.config.loading import (
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    read_yaml,
    validate_dict,
)

__all__ = [
    "JobConfig",
    "check_world_size",
    "config_from_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "validate_dict",
]
