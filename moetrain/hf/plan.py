"""What an import writes, worked out and checked before a byte is written (``moetrain import``).

:func:`make_plan` pairs every tensor rule of the family with the moetrain tensor it builds, using only
the source's headers and the moetrain model built on the meta device (no weights): the source tensors
exist, hold fp32 / bf16 / fp16, and convert (on meta tensors) to exactly the shape the config gives
the moetrain tensor; every parameter and every global expert's slice is built exactly once; and every
source tensor is read, except those the family skips on purpose (DeepSeek-V3's multi-token-prediction
layers) and a tied output head. A checkpoint that is incomplete, or holds tensors of a variant the
mapping does not know, is refused here, naming the tensor.

:func:`write_plan` then streams: per checkpoint file, one rule at a time (read the source tensors or one
expert's slice, convert, cast to the stored dtype, append), so memory holds one tensor, never a copy of
the model. The files (``moetrain.checkpoint``): ``shared.safetensors`` (``value/<param>`` fp32,
``buffer/<name>`` for buffers a rule builds, e.g. DeepSeek-V3's correction bias as int32 bits) and one
``experts_<k>.safetensors`` per MoE layer k (``value/<param>/<global expert id>`` fp32), which the
loaders find by key; and ``unmapped.safetensors``: the tensors the family skips on purpose, as they were
(:mod:`moetrain.checkpoint.initial`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from moetrain.checkpoint.initial import UNMAPPED
from moetrain.checkpoint.streaming import DTYPE_OF, SafetensorsWriter, TensorSpec
from moetrain.checkpoint.tensors import SHARED, experts_file
from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.errors import UserError
from moetrain.hf.convert import Reader, sources_of
from moetrain.hf.families.base import TensorRule
from moetrain.hf.source import HFSource
from moetrain.model import MoETransformer
from moetrain.moe.experts import is_expert_param

FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # converted to fp32 exactly
# Old checkpoints carry the rotary inverse frequencies as tensors; transformers ignores them on load too.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint the import writes, and the rule that builds it."""

    spec: TensorSpec
    rule: TensorRule


@dataclass
class ImportPlan:
    shared: list[Entry]  # shared.safetensors, in write order
    experts: dict[str, list[Entry]]  # experts file -> its entries, in write order
    skipped: list[str] = field(default_factory=list)  # source tensors no rule reads, on purpose
    unmapped: list[TensorSpec] = field(default_factory=list)  # of those, the ones kept as they are (UNMAPPED)

    @property
    def nbytes(self) -> int:
        entries = self.shared + [e for file in self.experts.values() for e in file]
        return sum(e.spec.nbytes for e in entries)


def meta_model(model: ModelConfig, moe: MoEConfig | None) -> MoETransformer:
    """The moetrain model on the meta device: every name, shape and dtype, and no storage."""
    moe = moe.model_copy(update={"expert_parallel_size": 1}) if moe is not None else None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # building draws seeds: leave the caller's RNG
        return MoETransformer(model, moe)


def make_plan(
    family: ModuleType, hf_config: dict, source: HFSource, model: ModelConfig, moe: MoEConfig | None
) -> ImportPlan:
    """Every rule matched to its checkpoint entry and checked (see the module docstring); raises UserError."""
    names = set(source.tensors)
    rules = family.rules(hf_config, names)
    built = meta_model(model, moe)
    params = dict(built.named_parameters())
    state = built.state_dict(keep_vars=True)
    buffers = {n: b for n, b in built.named_buffers() if n in state}  # persistent ones
    moe_blocks = moe.moe_blocks(model.n_layers) if moe is not None else []
    plan = ImportPlan([], {})
    written: dict[tuple[str, int | None], int] = {}
    for rule in rules:
        value = _converted_on_meta(rule, source, family)
        spec = _spec(rule, value, params, buffers, family)
        written[(rule.target, rule.expert)] = written.get((rule.target, rule.expert), 0) + 1
        if rule.expert is None:
            plan.shared.append(Entry(spec, rule))
        else:
            block = int(rule.target.split(".")[1])  # layers.<block>.ffn.experts.<param>
            plan.experts.setdefault(experts_file(moe_blocks.index(block)), []).append(Entry(spec, rule))
    _check_every_target_once(written, params, built)
    plan.skipped = _check_every_source_read(family, hf_config, rules, names, model.tie_embeddings)
    skip = getattr(family, "skipped_tensors", None)
    for name in skip(hf_config, names) if skip is not None else []:  # kept beside the checkpoint, as they are
        t = source.tensors[name]
        if t.dtype not in DTYPE_OF:
            raise UserError(f"SRC: tensor {name} is {t.dtype}, which moetrain cannot keep; dequantize the checkpoint")
        plan.unmapped.append(TensorSpec(name, DTYPE_OF[t.dtype], t.shape))
    return plan


def _converted_on_meta(rule: TensorRule, source: HFSource, family: ModuleType) -> torch.Tensor:
    """``rule.to_moetrain`` applied to meta tensors of the sources' shapes: the result's shape and dtype."""
    inputs = []
    for name in rule.sources:
        t = source.tensors.get(name)
        if t is None:
            raise UserError(
                f"SRC: no shard holds {name}, which the {family.ARCHITECTURE} mapping reads for moetrain's "
                f"{rule.target}: the checkpoint is incomplete or not a {family.ARCHITECTURE} as config.json says"
            )
        if t.dtype not in FLOATS:
            raise UserError(
                f"SRC: tensor {name} is {t.dtype}; moetrain imports fp32, bf16 or fp16 weights (quantized or "
                "integer weights: dequantize the checkpoint first)"
            )
        shape = t.shape
        if rule.index is not None:
            if not shape or rule.index >= shape[0]:
                raise UserError(
                    f"SRC: tensor {name} {list(shape)} has no expert {rule.index} (config.json: more experts)"
                )
            shape = shape[1:]
            if rule.rows is not None:
                if not shape or rule.rows[1] > shape[0]:
                    raise UserError(f"SRC: tensor {name} holds {list(t.shape)}, too few rows for config.json's width")
                shape = (rule.rows[1] - rule.rows[0], *shape[1:])
        inputs.append(torch.empty(shape, dtype=FLOATS[t.dtype], device="meta"))
    try:
        return rule.to_moetrain(*inputs)
    except RuntimeError as exc:  # e.g. parts that do not concatenate: the shapes disagree with config.json
        shapes = ", ".join(f"{n} {list(source.tensors[n].shape)}" for n in rule.sources)
        raise UserError(f"SRC: {shapes} do not fit config.json (building {rule.target}: {exc})") from None


def _spec(rule: TensorRule, value: torch.Tensor, params: dict, buffers: dict, family: ModuleType) -> TensorSpec:
    """The checkpoint entry ``rule`` builds, its shape checked against the moetrain model's."""
    if rule.target in params:
        target, dtype = params[rule.target], torch.float32  # the format keeps parameters as fp32
        key = f"value/{rule.target}"
    elif rule.target in buffers:
        target, key = buffers[rule.target], f"buffer/{rule.target}"
        dtype = target.dtype
        if value.dtype != dtype:
            raise RuntimeError(f"{family.__name__}: {rule.target} converts to {value.dtype}, the buffer is {dtype}")
    else:
        raise RuntimeError(f"{family.__name__}: a rule builds {rule.target}, which the moetrain model does not have")
    expected = tuple(target.shape)
    if rule.expert is not None:  # one global expert's slice [:, e] of a stacked [S, E, ...] parameter
        expected, key = (expected[0], *expected[2:]), f"{key}/{rule.expert}"
    if tuple(value.shape) != expected:
        raise UserError(
            f"SRC: {', '.join(rule.sources)} give moetrain's {rule.target}"
            f"{'' if rule.expert is None else f' (expert {rule.expert})'} the shape {list(value.shape)}, but "
            f"config.json describes {list(expected)}: the weights and config.json disagree"
        )
    return TensorSpec(key, dtype, expected)


def _check_every_target_once(written: dict, params: dict, model: MoETransformer) -> None:
    """Every parameter, and every global expert of a stacked one, built exactly once (a mapping bug else)."""
    for name, p in params.items():
        ids = [None] if not is_expert_param(name) else list(range(p.shape[1]))
        counts = {written.get((name, e), 0) for e in ids}
        if counts != {1}:
            raise RuntimeError(f"the family's rules build {name} {sorted(counts)} times (expected once): a mapping bug")


def _check_every_source_read(
    family: ModuleType, hf_config: dict, rules: list[TensorRule], names: set[str], tied: bool
) -> list[str]:
    """The source tensors no rule reads must be ones the family leaves out on purpose; returns them."""
    read = {s for rule in rules for s in rule.sources}
    skip = getattr(family, "skipped_tensors", None)
    skipped = set(skip(hf_config, names)) if skip is not None else set()
    skipped |= {n for n in names if IGNORED.match(n)}
    if tied and "lm_head.weight" in names:
        skipped.add("lm_head.weight")  # the embedding again
    unread = sorted(names - read - skipped)
    if unread:
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise UserError(
            f"SRC: the {family.ARCHITECTURE} mapping reads no {', '.join(unread[:3])}{more}: a variant of the "
            "family moetrain does not map (importing would drop them); nothing was written"
        )
    return sorted(skipped & names)


def write_plan(plan: ImportPlan, read: Reader, folder: Path, log: Callable[[str], None]) -> None:
    """Write the plan's files into ``folder``, one tensor at a time (see the module docstring)."""
    for file, entries in [(SHARED, plan.shared), *plan.experts.items()]:
        with SafetensorsWriter(folder / file, [e.spec for e in entries]) as out:
            for entry in entries:
                value = entry.rule.to_moetrain(*sources_of(entry.rule, read))
                out.write(entry.spec.key, value.to(entry.spec.dtype))
        log(f"  wrote {file}: {len(entries)} tensors, {sum(e.spec.nbytes for e in entries) / 1e6:.1f} MB")
    if plan.unmapped:
        with SafetensorsWriter(folder / UNMAPPED, plan.unmapped) as out:
            for spec in plan.unmapped:
                out.write(spec.key, read(spec.key, None, None))
        log(f"  kept {UNMAPPED}: {len(plan.unmapped)} tensors the model has no place for, as they were")
