"""Everything that touches DeepSpeed: its config block, optimizer parameter groups, engine setup.

moetrain owns the fields below and fills them from its own config; a user value in the
``deepspeed:`` block that disagrees is rejected (an equal value is accepted). Everything else in the
block is passed to DeepSpeed verbatim.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moetrain.errors import UserError

if TYPE_CHECKING:
    from moetrain.config import JobConfig

OWNED_ELSEWHERE = {
    "optimizer": "moetrain builds AdamW with its own parameter groups from optim.*",
    "scheduler": "moetrain builds the warmup + decay schedule from optim.*",
}


def owned_fields(cfg: "JobConfig") -> dict[str, tuple[str, Any]]:
    """DeepSpeed key -> (the moetrain field that sets it, its value)."""
    return {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", cfg.train.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", cfg.train.grad_accum_steps),
        "gradient_clipping": ("optim.grad_clip", cfg.optim.grad_clip),
    }


def check_deepspeed_block(cfg: "JobConfig") -> None:
    """Reject a ``deepspeed:`` block that fights moetrain's own settings (raises ValueError)."""
    block = cfg.deepspeed
    for key, why in OWNED_ELSEWHERE.items():
        if key in block:
            raise ValueError(f"deepspeed.{key}: not allowed ({why}); remove it and set optim.* instead")
    for key, (field, value) in owned_fields(cfg).items():
        if key in block and block[key] != value:
            raise ValueError(
                f"deepspeed.{key} ({block[key]!r}) conflicts with {field} ({value!r}); "
                f"set {field} and remove deepspeed.{key}"
            )
    for fmt in ("bf16", "fp16"):
        enabled = isinstance(block.get(fmt), dict) and block[fmt].get("enabled")
        if enabled and cfg.train.precision != fmt:
            raise ValueError(
                f"deepspeed.{fmt}.enabled (true) conflicts with train.precision ({cfg.train.precision!r}); "
                f"set train.precision: {fmt} instead"
            )
    zero = block.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2):
        raise ValueError(f"deepspeed.zero_optimization.stage ({stage!r}) must be 0, 1 or 2 (ZeRO-3 is not supported)")


def build_ds_config(cfg: "JobConfig", world_size: int) -> dict[str, Any]:
    ds = copy.deepcopy(cfg.deepspeed)
    for key, (_, value) in owned_fields(cfg).items():
        ds[key] = value
    if "train_batch_size" in ds:
        expected = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
        if ds["train_batch_size"] != expected:
            raise UserError(
                f"deepspeed.train_batch_size ({ds['train_batch_size']}) conflicts with train.micro_batch_size "
                f"x train.grad_accum_steps x world size ({expected}); remove deepspeed.train_batch_size"
            )
    precision = cfg.train.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: 'fp16' needs a CUDA device; use bf16 or fp32 on CPU")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds.setdefault("zero_optimization", {"stage": 0})
    if moetrain_clips(ds):
        ds["gradient_clipping"] = 0.0  # moetrain clips itself (EP-aware) before engine.step()
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def moetrain_clips(ds_config: dict[str, Any]) -> bool:
    """ZeRO-0 in fp32: DeepSpeed neither reports the gradient norm nor counts experts once under EP,
    so moetrain computes the norm and clips itself. ZeRO-1/2 and bf16/fp16 use DeepSpeed's optimizer."""
    mixed = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and not mixed


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ep_group) -> torch.Tensor:
    """Global gradient norm counting every parameter once, then clip (max_norm 0: measure only).

    norm^2 = |shared grads|^2 + sum over the EP group of |local expert grads|^2. Shared gradients are
    identical on every rank after the data-parallel reduction; expert gradients of one EP rank are
    identical across its expert-data-parallel replicas, so summing over the EP group counts each
    global expert exactly once.
    """
    shared, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (expert if is_expert_param(name) else shared).append(p.grad)
    device = next(model.parameters()).device
    def sq(grads):
        return torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=device)
    expert_sq = sq(expert)
    if ep_group is not None and torch.distributed.get_world_size(ep_group) > 1:
        torch.distributed.all_reduce(expert_sq, group=ep_group)
    norm = (sq(shared) + expert_sq).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in shared + expert:
            g.mul_(scale.to(g.dtype))
    return norm


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's own naming, so its lookups find our groups


def register_expert_parallel(model: nn.Module, layout) -> None:
    """Meet DeepSpeed's MoE contract for expert parallelism (ep > 1); call before initialize.

    1. Our EP and expert-data-parallel groups go into ``deepspeed.utils.groups`` under DeepSpeed's
       name for them (its default layout is ours: EP = consecutive ranks, expert-DP = stride ep).
    2. Expert parameters are tagged ``allreduce=False`` + ``group_name``: DeepSpeed then reduces
       their gradients over the expert-data-parallel group only (dividing by the world size, which
       is right: each expert's gradient already sums the losses of its whole EP group), broadcasts
       them within that group, and ZeRO-1/2 partitions them over it.
    3. A parameter-free marker module that ``isinstance``-matches ``deepspeed.moe.layer.MoE`` turns
       on the engine's MoE paths. It owns no experts, so DeepSpeed's own expert checkpoint files
       (which expect its module layout) stay empty: moetrain saves expert weights itself, by global
       expert id (see checkpoint.py).
    """
    if layout.ep_size == 1:
        return
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    name = expert_group_name(layout.ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = layout.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = layout.ep_ranks
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = layout.expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = layout.expert_dp_ranks
    for pname, p in model.named_parameters():
        if is_expert_param(pname):
            p.allreduce = False
            p.group_name = name

    class DeepSpeedMoEMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # NOTE: not MoE.__init__: no DeepSpeed experts or gate are built
            self.num_experts = 0
            self.num_local_experts = 0
            self.ep_size = layout.ep_size
            self.expert_group_name = name

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # the groups are ours, registered above

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("marker module")

    model.add_module("deepspeed_moe_marker", DeepSpeedMoEMarker())


def is_expert_param(module_name: str) -> bool:
    return ".experts." in f".{module_name}."


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


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def initialize_engine(model: nn.Module, optimizer, lr_scheduler, ds_config: dict[str, Any]):
    import deepspeed

    quiet_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    return engine
