"""``moetrain upcycle SRC [SRC ...] RUN_DIR --method sparse|granular|btx ...``: dense models as an MoE run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "upcycle",
        usage="moetrain upcycle SRC [SRC ...] RUN_DIR --method {sparse,granular,btx} --top-k K [--num-experts E] "
        "[--granularity G] [--every N] [--noise S] [--seed SEED] [key=value ...]",
        help="dense Hugging Face models (Llama, Qwen2, Qwen3) or dense moetrain runs as an MoE run directory: sparse upcycling, granular "
        "upcycling or BTX (docs/finetuning.md)",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="the dense model folders or run directories (btx: one per expert), then the run directory to create (new or empty); "
        "key=value overrides may follow (train.*, optim.*, data.*, moe.router.*, ...)",
    )
    p.add_argument("--method", choices=("sparse", "granular", "btx"), required=True)
    p.add_argument("--num-experts", type=int, help="experts per MoE layer (btx: the number of SRCs)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (granular: a multiple of G)")
    p.add_argument("--granularity", type=int, default=1, help="granular: slices of each copy's FFN (G)")
    p.add_argument("--every", type=int, default=1, help="an MoE layer in every N-th block; the others stay dense")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise on the experts, times each weight's std")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' init and the noise")
    p.set_defaults(run=run_upcycle, overrides=[])


def run_upcycle(args: argparse.Namespace) -> int:
    from moetrain.errors import UserError
    from moetrain.hf.upcycle import UpcycleSpec, upcycle

    paths = [a for a in args.paths if "=" not in a]
    overrides = [a for a in args.paths if "=" in a] + list(args.overrides)
    if len(paths) < 2:
        raise UserError(
            f"upcycle takes SRC [SRC ...] RUN_DIR, got {len(paths)} path(s): give the dense model(s), then RUN_DIR"
        )
    spec = UpcycleSpec(args.method, args.num_experts, args.top_k, args.granularity, args.every, args.noise, args.seed)
    upcycle([Path(p) for p in paths[:-1]], Path(paths[-1]), spec, overrides, log=lambda line: print(line, flush=True))
    return 0
