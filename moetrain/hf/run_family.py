"""A moetrain checkpoint of a dense model read as a "family" (``moetrain upcycle`` of a run directory):
each ``value/<param>`` tensor is the parameter ``<param>`` as it is. :mod:`moetrain.hf.plan` checks the
tensors against the model the run's config describes, as it checks a Hugging Face folder."""

from __future__ import annotations

from moetrain.hf.families.base import TensorRule, copy_rule

ARCHITECTURE = "a moetrain run of a dense model"
MODEL_TYPES: tuple[str, ...] = ()


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    return [copy_rule(name.removeprefix("value/"), name) for name in sorted(tensor_names or ())]
