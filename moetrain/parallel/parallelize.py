"""Apply a parallel layout to a model that was built for one process (torchtitan's pattern).

The model never sees the layout while it is built: ``MoETransformer(cfg, moe_cfg)`` holds every
expert and the local dispatcher. :func:`parallelize` then, per MoE layer:

1. points the router's statistics (StableMoE's balance-loss counts, the Switch load-balance
   fractions) at the data-parallel group, so they cover the global micro-batch;
2. with ``ep_size > 1`` (or ``layout.force_all_to_all``), keeps this rank's E/ep experts (:meth:`GroupedExperts.shard`: each kept
   expert has exactly the weights it had in the whole model) and swaps the local dispatcher for the
   all-to-all one over the expert-parallel group;
3. with ``moe.dispatch: hierarchical`` and EP groups that span nodes, the two-phase all-to-all
   (``moetrain/parallel/hierarchical.py``) instead.

NOTE: the whole model is materialised on every rank before sharding, so peak host memory at setup
is one full copy of the model per rank (building on the meta device is not supported yet).
"""

from __future__ import annotations

from torch import nn

from moetrain.moe.layer import MoELayer
from moetrain.parallel.all_to_all import AllToAllDispatcher
from moetrain.parallel.hierarchical import HierarchicalDispatcher
from moetrain.parallel.layout import ParallelLayout


def parallelize(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Shard ``model``'s experts over ``layout``'s expert-parallel group, in place; returns ``model``."""
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        layer.router.stats_group = layout.stats_group  # 1.
        if layout.ep_size > 1 or layout.force_all_to_all:  # 2. (forced: over a group of one, for checks)
            layer.experts.shard(layout.ep_rank, layout.ep_size)
            args = (layer.num_experts, layer.capacity_factor, layer.backend, layout.ep_group, layer.skips_slots)
            if layer.dispatch == "hierarchical" and layout.topology is not None:  # 3. EP groups span nodes
                layer.dispatcher = HierarchicalDispatcher(*args, topology=layout.topology)
            else:
                layer.dispatcher = AllToAllDispatcher(*args, overlap=layer.ep_overlap)
    return model
