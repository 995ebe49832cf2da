"""Exact parameter counts of a job's model, from the real model built on the meta device.

Nothing is re-derived from the config: ``MoETransformer`` is built under ``torch.device("meta")``
(shapes only, no memory, a fraction of a second even at 30B parameters) and its parameters are
counted, so every option the model grows is counted the day it lands.

The optimizer's parameter groups are counted too, in the order training builds them
(``moetrain/training/optim.py``: shared / expert x decay / no decay, then the parameters modules tag
for groups of their own, e.g. StableMoE's distilled router: ``moetrain/moe/hooks.py``): ZeRO flattens and pads each group separately (``moetrain/planning/states.py``).
``tests/test_planning.py`` checks these groups against ``training.optim`` for several models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.moe.experts import is_expert_param
from moetrain.moe.hooks import optimizer_group_tags


@dataclass(frozen=True)
class GroupSize:
    """One optimizer group: whether it holds experts, and its parameters' element counts in order
    (expert parameters: all global experts; a rank holds 1/ep of each)."""

    name: str
    expert: bool
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of the whole model (every global expert), each tied weight once."""

    shared: int  # every parameter that is not an expert's (replicated on every rank)
    expert: int  # the routed experts of every MoE layer, all global experts
    groups: tuple[GroupSize, ...]
    active_expert: int  # expert parameters one token passes through (top-k of each MoE layer)

    @property
    def total(self) -> int:
        return self.shared + self.expert

    def local(self, ep_size: int) -> int:
        """Parameters one rank holds under expert parallelism of size ``ep_size``."""
        return self.shared + self.expert // ep_size


def build_on_meta(model: ModelConfig, moe: MoEConfig | None) -> MoETransformer:
    """The job's model with meta tensors (``model.vocab_size`` must be resolved)."""
    with torch.device("meta"):
        return MoETransformer(model, moe, "none")


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """``moetrain.training.optim.param_groups``'s rule (checked against it by the tests)."""
    return p.ndim < 2 or name.endswith(".bias") or ".ln" in name or "ln_" in name or name.startswith("pos.")


def optimizer_groups(model: nn.Module) -> tuple[GroupSize, ...]:
    """The parameter groups training builds, as element counts: (expert, no_decay) sorted, then the
    parameters modules tag (``optimizer_group_tags``) moved into groups ``<tag>/<group>``, appended last
    (``training.optim.isolate_tagged_params``)."""
    tags = optimizer_group_tags(model)
    groups: dict[tuple[bool, bool], list[tuple[int, int]]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups.setdefault((is_expert_param(name), _no_decay(name, p)), []).append((id(p), p.numel()))
    kept, moved = [], []
    for (expert, no_decay), params in sorted(groups.items()):
        name = f"{'expert' if expert else 'shared'}_{'no_decay' if no_decay else 'decay'}"
        rest = tuple(n for pid, n in params if pid not in tags)
        if rest:
            kept.append(GroupSize(name, expert, rest))
        for tag in dict.fromkeys(tags[pid] for pid, _ in params if pid in tags):
            moved.append(GroupSize(f"{tag}/{name}", expert, tuple(n for pid, n in params if tags.get(pid) == tag)))
    return tuple(kept + moved)


def model_size(model: ModelConfig, moe: MoEConfig | None) -> ModelSize:
    """Count the parameters of the job's model (built on the meta device)."""
    built = build_on_meta(model, moe)
    shared = expert = 0
    seen: set[int] = set()
    for name, p in built.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_expert_param(name):
            expert += p.numel()
        else:
            shared += p.numel()
    active = 0
    if moe is not None:
        top_k = getattr(moe.router, "top_k", 1)
        for layer in built.moe_layers():
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
            active += min(top_k, layer.num_experts) * per_expert
    return ModelSize(shared, expert, optimizer_groups(built), active)
