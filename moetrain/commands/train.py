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
    """1. the config, and the run dir writable (before any heavy setup); 2. the process group; 3. train.
    ``args.callbacks``: extra training callbacks (``moetrain.cli.main(..., callbacks=...)``)."""
    from moetrain.config import load_config
    from moetrain.training.run_dir import check_run_dir_writable

    cfg = load_config(args.config, args.overrides)
    check_run_dir_writable(cfg.resolved_run_dir)
    _prepare_process_env()
    from moetrain.parallel.layout import ParallelLayout, env_rank_world
    from moetrain.training.trainer import Trainer

    cfg.check_world_size(env_rank_world()[1])  # the layout against the launcher's world size
    layout = ParallelLayout.init(cfg.ep_size, timeout_s=cfg.train.collective_timeout_s)
    trainer = Trainer(cfg, layout, getattr(args, "callbacks", None))
    trainer.setup()
    trainer.train()
    return 0


def _prepare_process_env() -> None:
    """DeepSpeed on the CPU accelerator without probing for GPUs; a free port for a lone process."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "MASTER_PORT" not in os.environ and "WORLD_SIZE" not in os.environ:
        from moetrain.parallel.layout import free_port

        os.environ["MASTER_PORT"] = str(free_port())  # a lone process: its own process group
