"""``moetrain train``: one process of a training job (plain, torchrun, the deepspeed launcher or srun)."""

from __future__ import annotations

import argparse
import os

from moetrain.commands import add_config_args


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (plain process, torchrun, deepspeed launcher or srun)")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """1. the config, and the run dir writable (before any heavy setup); 2. the offload check; 3. the process
    group (rank 0 prints where the EP groups lie); 4. train.
    ``args.callbacks``: extra training callbacks (``moetrain.cli.main(..., callbacks=...)``)."""
    from moetrain.config import load_config
    from moetrain.training.run_dir import check_run_dir_writable

    cfg = load_config(args.config, args.overrides)
    check_run_dir_writable(cfg.resolved_run_dir)
    _prepare_process_env()
    from moetrain.training.offload import check_offload

    check_offload(cfg)  # DeepSpeed's CPU Adam must be buildable before anything heavy starts
    from moetrain.parallel.layout import ParallelLayout, env_rank_world
    from moetrain.training.trainer import Trainer

    cfg.check_world_size(env_rank_world()[1])  # the layout against the launcher's world size
    hierarchical = cfg.moe is not None and cfg.moe.dispatch == "hierarchical"
    layout = ParallelLayout.init(cfg.ep_size, timeout_s=cfg.train.collective_timeout_s, hierarchical=hierarchical)
    _print_placement(layout, hierarchical)
    trainer = Trainer(cfg, layout, getattr(args, "callbacks", None))
    trainer.setup()
    trainer.train()
    return 0


def _print_placement(layout, hierarchical: bool) -> None:
    """Rank 0, once: which ranks share a node and where the EP groups lie (docs/launching.md)."""
    if layout.rank != 0 or layout.world_size == 1:
        return
    place = layout.placement
    print(place.describe(), flush=True)
    if place.warning:
        print(place.warning, flush=True)
    if hierarchical:
        how = "two-phase" if layout.topology is not None else "flat: its EP groups do not span nodes evenly"
        print(f"moe.dispatch hierarchical: the token exchange is {how}", flush=True)


def _prepare_process_env() -> None:
    """DeepSpeed on the CPU accelerator without probing for GPUs (a lone process binds no port:
    ``ParallelLayout.init`` gives it an in-process store)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
