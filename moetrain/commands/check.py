"""``moetrain validate`` (a config, its layout and the planner's memory total, nothing started) and
``moetrain report`` (plots)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moetrain.commands import add_config_args


def add_parsers(sub) -> None:
    p = sub.add_parser("validate", help="check a config (and the parallel layout) without training")
    add_config_args(p)
    p.add_argument("--world-size", type=int, default=None, help="also check the layout for this many ranks")
    p.add_argument("--gpu-memory", default=None, help="warn when the planned memory per GPU exceeds this, e.g. 80GB")
    p.set_defaults(run=run_validate)
    p = sub.add_parser(
        "report",
        help="draw PNG plots (loss, expert load, routing, fluctuation) of run directories; with two or more, "
        "also overlay their validation-loss curves",
    )
    p.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directories holding metrics.jsonl")
    p.add_argument(
        "--out", default="val_loss_overlay.png", help="the overlay PNG (two or more runs; default: %(default)s)"
    )
    p.set_defaults(run=run_report)


def run_validate(args: argparse.Namespace) -> int:
    from moetrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None:
        cfg.check_world_size(args.world_size)
    if args.gpu_memory is not None:
        from moetrain.planning.units import parse_size

        parse_size(args.gpu_memory, "--gpu-memory")  # before anything heavy
    from moetrain.commands.plan import check_offload, memory_lines

    check_offload(cfg)
    where = f" for world size {args.world_size}" if args.world_size else ""
    print(f"config ok{where}: {args.config}")
    for line in memory_lines(cfg, args.world_size, args.gpu_memory):
        print(line)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from moetrain.report import make_overlay, make_report

    run_dirs = [Path(d) for d in args.run_dirs]
    for run_dir in run_dirs:
        for path in make_report(run_dir):
            print(f"wrote {path}")
    if len(run_dirs) > 1:
        print(f"wrote {make_overlay(run_dirs, Path(args.out))}")
    return 0
