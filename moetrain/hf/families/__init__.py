"""One module per Hugging Face model family, each implementing :class:`~moetrain.hf.families.base.Family`.

- :mod:`.mixtral`, :mod:`.qwen2_moe`, :mod:`.qwen3_moe`, :mod:`.olmoe`, :mod:`.deepseek_v3`: the families;
- :mod:`.rope`: rotary positions of every family (plain and scaled);
- :mod:`.decoder`: what those four Llama-style MoE decoders share;
- :mod:`.llama`, :mod:`.qwen2`, :mod:`.qwen3`: dense families (what they share: :mod:`.dense`), the
  sources of ``moetrain upcycle``;
- :mod:`.base`: the contract (tensor rules, :class:`~moetrain.hf.families.base.UnsupportedConfigError`).

:func:`family_for` picks an MoE family by a ``config.json``'s ``model_type``, :func:`dense_family_for` a
dense one.
"""

from __future__ import annotations

from types import ModuleType

from moetrain.hf.families import deepseek_v3, llama, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe
from moetrain.hf.families.base import UnsupportedConfigError

FAMILIES: dict[str, ModuleType] = {
    t: m for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3) for t in m.MODEL_TYPES
}
DENSE_FAMILIES: dict[str, ModuleType] = {t: m for m in (llama, qwen2, qwen3) for t in m.MODEL_TYPES}


def family_for(model_type: str | None) -> ModuleType:
    """The family module that maps ``model_type``; refuses any other, naming the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedConfigError("model_type", model_type, f"not a supported family; supported: {supported}")
    return FAMILIES[model_type]


def dense_family_for(model_type: str | None) -> ModuleType:
    """The dense family module that maps ``model_type``; refuses any other, naming the supported ones."""
    if model_type not in DENSE_FAMILIES:
        supported = ", ".join(sorted(DENSE_FAMILIES))
        raise UnsupportedConfigError("model_type", model_type, f"not a supported dense family; supported: {supported}")
    return DENSE_FAMILIES[model_type]
