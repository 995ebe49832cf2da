"""Parallelism applied to a built model: process groups, expert sharding, the all-to-all dispatcher,
the EP-aware gradient norm, and DeepSpeed's MoE contract. Takes plain values (a
:class:`~moetrain.parallel.layout.ParallelLayout`, groups), never the job config."""
