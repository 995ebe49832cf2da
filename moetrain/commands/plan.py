"""``moetrain plan``: per-GPU memory of a job, itemised, and the layouts that fit (``moetrain/planning/``).

``moetrain validate --gpu-memory`` prints the planner's total too (``commands/check.py``, through
:func:`memory_lines` here). Flags are checked before torch is imported; the model is built on the meta device.
"""

from __future__ import annotations

import argparse
import os

from moetrain.commands import add_config_args
from moetrain.errors import UserError


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory of a job, itemised, and the layouts that fit, best first (docs/parallelism.md)",
    )
    add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1); world size = nodes x gpus")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB; GB = GiB here)")
    p.add_argument(
        "--imbalance", type=float, default=2.0, help="the busiest EP rank receives this many times the mean rows"
    )
    p.add_argument("--overhead", default="2GB", help="fixed per-GPU overhead: CUDA context, NCCL, slack")
    p.add_argument("--top", type=int, default=10, help="how many fitting layouts to list")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from moetrain.config import load_config

    # logging does not change memory; a config that enables wandb plans without wandb installed
    cfg = load_config(args.config, [*args.overrides, "logging.wandb.enabled=false"])
    from moetrain.planning.request import check_request

    request = check_request(cfg, args.gpus, args.nodes, args.gpu_memory, args.imbalance, args.overhead, args.top)
    check_offload(cfg)
    from moetrain.data.vocab import with_vocab_size
    from moetrain.planning.command import plan
    from moetrain.training.offload import cpu_adam_problem

    cfg = with_vocab_size(cfg)
    print("\n".join(plan(cfg, request, cpu_adam_problem())))
    return 0


def check_offload(cfg) -> None:
    """Refuse optimizer offload where DeepSpeed's CPU Adam can be neither loaded nor built (UserError).
    That imports DeepSpeed's op builder, never DeepSpeed's engine: on a machine without CUDA its
    accelerator is named first so it does not probe and warn."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from moetrain.training.offload import check_offload as check

    check(cfg)


def memory_lines(cfg, world_size: int | None, gpu_memory: str | None) -> list[str]:
    """``validate``: the planner's total for ``cfg`` on ``world_size`` ranks, warning past ``gpu_memory``;
    one 'skipped' line where the vocabulary size cannot be known here (the config is still fine)."""
    from moetrain.data.vocab import with_vocab_size
    from moetrain.planning.command import memory_lines as planned

    try:
        cfg = with_vocab_size(cfg)
    except UserError as exc:  # a hub tokenizer not cached here: no estimate
        return [f"memory estimate skipped: {exc}"]
    return planned(cfg, world_size or 1, gpu_memory)
