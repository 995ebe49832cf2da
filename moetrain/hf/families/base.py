"""The contract of a Hugging Face family mapping: config fields and tensors, both directions, exact.

A family maps a ``config.json`` (a plain dict) onto moetrain's ``model`` and ``moe`` config sections,
and every tensor of the family's checkpoint onto one moetrain parameter (or one global expert's slice
of a stacked expert parameter), with the inverse for export. Conversions are pure tensor reshapes,
transposes, splits and concatenations: no arithmetic, so a round trip is bit for bit.

Import streams through :meth:`Family.rules`: for each rule it reads only that rule's source tensors,
converts, and writes the result, so at most one parameter (or one expert's slice) is in memory besides
what the reader maps. Stacked expert parameters ``w*_SLDF`` / ``w*_SLFD`` are converted one global
expert at a time (``TensorRule.expert``): the slice ``[:, e]`` of shape ``[S, D, F]`` (or ``[S, F, D]``),
which is exactly how moetrain's checkpoint stores experts (one entry per global expert id).

A config field or value a family cannot represent exactly raises :class:`UnsupportedConfigError` naming the
field, the value and what is supported -- never an approximate import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Fields:
    """A config.json read as its ``transformers`` class reads it: ``f["hidden_size"]`` is the file's
    value, or the class's default when the file omits it. ``aliases`` (the class's ``attribute_map``,
    alias -> field) name one field twice; a file that gives both with different values is refused
    (transformers then takes whichever comes first in the file)."""

    def __init__(self, raw: dict, defaults: dict[str, Any], aliases: dict[str, str] | None = None) -> None:
        self.raw, self.defaults, self.aliases = raw, defaults, aliases or {}
        for alias, name in self.aliases.items():
            if alias in raw and name in raw and raw[alias] != raw[name]:
                raise UnsupportedConfigError(
                    alias, raw[alias], f"it names the same setting as {name} ({raw[name]!r}); give one of them"
                )

    def __getitem__(self, name: str) -> Any:
        name = self.aliases.get(name, name)
        if name in self.raw:
            return self.raw[name]
        for alias, target in self.aliases.items():
            if target == name and alias in self.raw:
                return self.raw[alias]
        return self.defaults[name]


class UnsupportedConfigError(ValueError):
    """A Hugging Face config field whose value moetrain cannot represent exactly (``where``:
    ``"config.json"``), or, on export, a moetrain field the family cannot represent
    (``where``: ``"moetrain config"``)."""

    def __init__(self, field: str, value: Any, why: str, where: str = "config.json") -> None:
        super().__init__(f"{where} field {field} = {value!r}: {why}")
        self.field, self.value, self.why = field, value, why


@dataclass(frozen=True)
class TensorRule:
    """One moetrain tensor built from one or more Hugging Face tensors, and back.

    ``target``: the moetrain parameter name (as in ``MoETransformer.named_parameters()``).
    ``expert``: for a stacked expert parameter, the global expert id whose slice ``[:, expert]`` this
    rule builds; None for every other parameter (the whole tensor).
    ``sources``: the Hugging Face tensor names, in the order ``to_moetrain`` takes them.
    ``index``: when set, each source is a fused per-expert tensor ``[E, ...]`` and the rule reads only
    ``source[index]`` (the reader takes that slice without loading the rest).
    ``rows``: with ``index``, only rows ``rows[0]:rows[1]`` of that slice, ``source[index, a:b]``: one
    part of a fused tensor that feeds two moetrain parameters (the gate half of ``gate_up_proj`` is
    ``w1``, the up half ``w3``); the rules of one fused slice's parts cover it exactly once.
    ``to_moetrain(*sources) -> tensor``; ``to_hf(tensor) -> tuple`` of tensors in ``sources`` order
    (with ``index``: the slices ``source[index]``, or ``source[index, a:b]`` with ``rows``).
    """

    target: str
    sources: tuple[str, ...]
    to_moetrain: Callable[..., torch.Tensor]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    expert: int | None = None
    index: int | None = None
    rows: tuple[int, int] | None = None


def same(t: torch.Tensor) -> torch.Tensor:
    return t


def same_back(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t,)


def copy_rule(target: str, source: str) -> TensorRule:
    """The tensor as it is (embeddings, norms, biases)."""
    return TensorRule(target, (source,), same, same_back)


def linear_rule(target: str, source: str) -> TensorRule:
    """An ``nn.Linear`` weight that moetrain also keeps as an ``nn.Linear`` ([out, in]): unchanged."""
    return copy_rule(target, source)


def transpose_rule(target: str, source: str) -> TensorRule:
    """An ``nn.Linear`` weight [out, in] that moetrain keeps as a matrix it multiplies by (``x @ w``, [in, out])."""
    return TensorRule(target, (source,), lambda w: w.t().contiguous(), lambda t: (t.t().contiguous(),))


def expert_rule(target: str, source: str, expert: int) -> TensorRule:
    """One expert's ``nn.Linear`` weight [out, in] -> moetrain's stacked slice [1, in, out] (x @ w)."""
    return TensorRule(
        target, (source,), lambda w: w.t().unsqueeze(0).contiguous(), lambda t: (t[0].t().contiguous(),), expert
    )


def fused_expert_rule(target: str, source: str, expert: int, rows: tuple[int, int] | None = None) -> TensorRule:
    """Expert ``expert``'s ``[out, in]`` slice of a fused ``[E, out, in]`` tensor (rows ``rows`` of it,
    when it holds two weights) -> moetrain's stacked slice [1, in, out]: :func:`expert_rule`, read by index."""
    by_name = expert_rule(target, source, expert)
    return TensorRule(target, (source,), by_name.to_moetrain, by_name.to_hf, expert, index=expert, rows=rows)


def concat_rule(target: str, sources: tuple[str, ...], sizes: list[int], dim: int = 0) -> TensorRule:
    """Several tensors concatenated along ``dim`` (e.g. q, k, v projections -> moetrain's fused qkv);
    ``sizes``: each part's size along ``dim`` (from the config), to split it back on export."""
    return TensorRule(
        target,
        sources,
        lambda *ts: torch.cat(ts, dim=dim),
        lambda t: tuple(p.contiguous() for p in t.split(sizes, dim=dim)),
    )


class Family(Protocol):
    """What a family module provides (module-level names)."""

    #: ``config.json`` ``model_type`` values this module maps, e.g. ``("qwen2_moe",)``.
    MODEL_TYPES: tuple[str, ...]
    #: The ``transformers`` class export writes (``architectures[0]``), e.g. ``"Qwen2MoeForCausalLM"``.
    ARCHITECTURE: str

    def check(self, hf_config: dict) -> None:
        """Raise :class:`UnsupportedConfigError` for any field/value this family cannot map exactly."""

    def to_moetrain(self, hf_config: dict) -> dict[str, Any]:
        """``{"model": {...}, "moe": {...} | None}``: moetrain config sections (plain dicts) computing
        exactly what the family's ``transformers`` class computes (``vocab_size`` included)."""

    def rules(self, hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
        """Every moetrain parameter (and every global expert's slice) and how it is built. Together
        they cover every parameter of the moetrain model and every tensor of the HF checkpoint (tied
        output heads excepted).

        ``tensor_names``: the checkpoint's tensor names, to choose between the layouts a family's
        checkpoints come in (one tensor per expert, as on the Hub, or fused ``[E, ...]`` expert tensors
        as newer ``transformers`` may write); None: the layout export writes."""

    def to_hf_config(self, hf_config: dict, model: dict, moe: dict | None) -> dict:
        """The ``config.json`` for export: the imported one with the fields moetrain owns updated from
        the (possibly trained/changed) moetrain sections; raises UnsupportedConfigError if the moetrain model
        is no longer this family."""

    # Optional, for a family whose checkpoints hold tensors outside its class's forward pass (DeepSeek-V3's
    # multi-token-prediction layers): ``skipped_tensors(hf_config, tensor_names) -> list[str]`` names them
    # (import keeps them beside its step-0 checkpoint), and ``without_skipped(hf_config) -> dict`` is the
    # config update for an export that leaves them out.
