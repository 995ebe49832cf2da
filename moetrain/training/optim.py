"""The optimizer's side of training: AdamW parameter groups and the learning-rate schedule.

- :func:`param_groups`: no weight decay on norms, biases and positions; experts in their own groups
  (expert parallelism reduces their gradients over the expert-data-parallel group only);
- :func:`isolate_tagged_params` / :func:`freeze_groups`: parameters a module tags
  (``optimizer_group_tags``, e.g. StableMoE's distilled router) in groups of their own, whose learning
  rate and weight decay a between-steps hook can set to 0 (why: ``moetrain/moe/routers/stablemoe_schedule.py``);
- :func:`lr_lambda`: linear warmup, then cosine / linear decay.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from moetrain.config.training import OptimConfig
from moetrain.moe.experts import is_expert_param
from moetrain.moe.hooks import optimizer_group_tags
from moetrain.parallel.deepspeed_moe import expert_group_name


def param_groups(model: nn.Module, weight_decay: float, ep_size: int = 1) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases and embeddings' positions; experts in their own groups.

    Expert groups are separate so that expert parallelism can reduce their gradients over the
    expert-data-parallel group only.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        no_decay = p.ndim < 2 or name.endswith(".bias") or ".ln" in name or "ln_" in name or name.startswith("pos.")
        groups.setdefault((is_expert_param(name), no_decay), []).append(p)
    out = []
    for (expert, no_decay), params in sorted(groups.items()):
        group = {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'expert' if expert else 'shared'}_{'no_decay' if no_decay else 'decay'}",
        }
        if expert and ep_size > 1:  # DeepSpeed's MoE group contract: 'moe' flag, name = the EP group's
            group.update(moe=True, name=expert_group_name(ep_size))
        out.append(group)
    return out


def isolate_tagged_params(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move the parameters modules tag (``optimizer_group_tags``) into groups of their own: same
    hyperparameters, name ``<tag>/<group>``, appended last, so that :func:`freeze_groups` can freeze
    them without touching the others."""
    tags = optimizer_group_tags(model)
    if not tags:
        return groups
    kept, moved = [], []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in tags]
        if rest:
            kept.append({**group, "params": rest})
        for tag in dict.fromkeys(tags[id(p)] for p in group["params"] if id(p) in tags):
            mine = [p for p in group["params"] if tags.get(id(p)) == tag]
            moved.append({**group, "params": mine, "name": f"{tag}/{group.get('name', 'params')}"})
    return kept + moved


def freeze_groups(optimizer, lr_scheduler, tag: str) -> int:
    """Set lr and weight decay of the groups of parameters tagged ``tag`` to 0 (and their scheduler
    base lr).

    ``optimizer`` is the torch optimizer whose param-group dicts the steps read (DeepSpeed's ZeRO and
    bf16 wrappers keep the client optimizer's dicts and swap only their ``params`` for flat
    partitions). Returns the number of groups changed.
    """
    changed = 0
    for i, group in enumerate(optimizer.param_groups):
        if str(group.get("name", "")).startswith(f"{tag}/"):
            group["lr"] = 0.0
            group["weight_decay"] = 0.0
            if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                lr_scheduler.base_lrs[i] = 0.0
            changed += 1
    return changed


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine / linear decay to ``min_lr_ratio`` (multiplier of ``lr``)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f
