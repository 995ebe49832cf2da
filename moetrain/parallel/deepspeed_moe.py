"""DeepSpeed's MoE contract, met for moetrain's own expert-parallel model (all of it in this file).

DeepSpeed's engine recognises MoE by ``isinstance(module, deepspeed.moe.layer.MoE)`` and then treats
parameters tagged ``allreduce=False`` + ``group_name`` as expert parameters: it reduces their
gradients over the expert-data-parallel group only, ZeRO-1/2 partitions them over it, and it looks
the groups up by name in ``deepspeed.utils.groups``. Those group tables are private module globals
of DeepSpeed: :func:`check_deepspeed_moe_api` says clearly when a DeepSpeed release changes them
(tested on the versions ``setup.py`` allows), instead of failing deep inside the engine.

ZeRO-3 (``partition_weights``) meets the contract DeepSpeed's stage 3 keeps for AutoEP's layers instead
(docs/parallelism.md, "ZeRO-3"): stage 3 refuses a model with a native ``MoE`` module, and partitions a
parameter over the expert-data-parallel group only when its placement family says it is an expert.
"""

from __future__ import annotations

from torch import nn

from moetrain.moe.experts import is_expert_param
from moetrain.parallel.layout import ParallelLayout

# The private names of deepspeed.utils.groups that expert parallelism writes to and DeepSpeed reads.
GROUP_TABLES = (
    "_EXPERT_PARALLEL_GROUP",
    "_EXPERT_PARALLEL_GROUP_RANKS",
    "_EXPERT_DATA_PARALLEL_GROUP",
    "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
)
# ... and the lookups DeepSpeed's engine and ZeRO optimizers make in them.
GROUP_GETTERS = (
    "_get_expert_parallel_group",
    "_get_expert_data_parallel_group",
    "_get_expert_parallel_group_dict",
    "_get_expert_data_parallel_group_dict",
    "_get_expert_parallel_world_size",
    "_get_expert_parallel_rank",
    "_get_expert_broadcast_src_rank",
)


# What DeepSpeed's stage 3 reads for expert parameters (ZeRO-3 under expert parallelism): the module class
# its engine accepts as an MoE layer at stage 3, and the placement-family tags its partitioner reads.
ZERO3_MARKER_CLASS = ("deepspeed.module_inject.auto_ep_layer", "AutoEPMoELayer")
ZERO3_FAMILY_ATTR, ZERO3_EXPERT_FAMILY, ZERO3_GROUP_ATTR = (
    "ds_zero_placement_family",
    "autoep_expert",
    "ds_zero_partition_group_name",
)
# ... and the stage-3 code that acts on those tags (its absence means the tags would be ignored silently).
ZERO3_HOOKS = (
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_resolve_zero3_param_placement"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "_autoep_expert_parallel_group"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "_gradient_averaging_world_size"),
)


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's own naming, so its lookups find our groups


def check_deepspeed_moe_api() -> None:
    """Raise a clear error if DeepSpeed's private MoE group API is not what moetrain relies on."""
    import deepspeed
    from deepspeed.moe.layer import MoE  # noqa: F401 - the class the engine matches
    from deepspeed.utils import groups

    missing = [n for n in GROUP_TABLES if not isinstance(getattr(groups, n, None), dict)]
    missing += [] if hasattr(groups, "_WORLD_GROUP") else ["_WORLD_GROUP"]  # given a timeout by layout.py
    missing += [n for n in GROUP_GETTERS if not callable(getattr(groups, n, None))]
    if missing:
        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} changed its private MoE group API (deepspeed.utils.groups has "
            f"no {', '.join(missing)}); expert parallelism in moetrain is tested with the versions setup.py "
            "allows: install one of those"
        )


def check_deepspeed_zero3_moe_api() -> None:
    """Raise a clear error if DeepSpeed's stage 3 does not partition AutoEP-tagged expert parameters
    the way moetrain relies on (the names above)."""
    import importlib

    import deepspeed

    missing = []
    module, cls = ZERO3_MARKER_CLASS
    if not isinstance(getattr(importlib.import_module(module), cls, None), type):
        missing.append(f"{module}.{cls}")
    for module, cls, method in ZERO3_HOOKS:
        if not callable(getattr(getattr(importlib.import_module(module), cls, None), method, None)):
            missing.append(f"{cls}.{method}")
    if missing:
        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} changed how ZeRO-3 partitions expert parameters (no "
            f"{', '.join(missing)}); ZeRO-3 with expert parallelism in moetrain is tested with the versions "
            "setup.py allows: install one of those, or use deepspeed.zero_optimization.stage 0, 1 or 2"
        )


def register_expert_parallel(model: nn.Module, layout: ParallelLayout, partition_weights: bool = False) -> None:
    """Meet DeepSpeed's MoE contract for expert parallelism (ep > 1); call before ``deepspeed.initialize``.

    1. Our EP and expert-data-parallel groups go into ``deepspeed.utils.groups`` under DeepSpeed's
       name for them (its default layout is ours: EP = consecutive ranks, expert-DP = stride ep).
    2. Expert parameters are tagged ``allreduce=False`` + ``group_name``: DeepSpeed then reduces
       their gradients over the expert-data-parallel group only (dividing by the world size, which
       is right: each expert's gradient already sums the losses of its whole EP group), broadcasts
       them within that group, and ZeRO-1/2 partitions them over it.
    3. A parameter-free marker module that ``isinstance``-matches ``deepspeed.moe.layer.MoE`` turns
       on the engine's MoE paths. It owns no experts, so DeepSpeed's own expert checkpoint files
       (which expect its module layout) stay empty: moetrain saves expert weights itself, by global
       expert id (see ``moetrain/training/checkpoint.py``).
    4. ``partition_weights`` (ZeRO-3): expert parameters also carry stage 3's placement family for
       experts and the EP group's name. Stage 3 then partitions their weights, gradients and Adam state
       over the expert-data-parallel group (the shared ones over all ranks), averages their gradients
       over the world size and sums their gradient norm over the EP group. The marker is then a
       parameter-free ``AutoEPMoELayer``, the only MoE module stage 3 accepts.
    """
    if layout.ep_size == 1:
        return
    check_deepspeed_moe_api()
    if partition_weights:
        check_deepspeed_zero3_moe_api()
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
            if partition_weights:
                setattr(p, ZERO3_FAMILY_ATTR, ZERO3_EXPERT_FAMILY)
                setattr(p, ZERO3_GROUP_ATTR, name)
    if partition_weights:
        model.add_module("deepspeed_moe_marker", _zero3_marker(layout.ep_size, name))
        return

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


def _zero3_marker(ep_size: int, name: str) -> nn.Module:
    """A parameter-free module that DeepSpeed's engine takes for an AutoEP layer (ZeRO-3's MoE check)."""
    import importlib

    module, cls = ZERO3_MARKER_CLASS
    base = getattr(importlib.import_module(module), cls)

    class DeepSpeedZeRO3MoEMarker(base):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # NOTE: not AutoEPMoELayer.__init__: it would build a router and experts
            self.num_experts = 0
            self.num_local_experts = 0
            self.ep_size = ep_size
            self.ep_group_name = name

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # the groups are ours, registered above

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("marker module")

    return DeepSpeedZeRO3MoEMarker()
