"""``moetrain train | prepare | tokenizer train | validate | launch`` — the thin entry point.

Errors in user input (config, data, checkpoint, CLI) print one ``error:`` message and exit with code 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from moetrain.errors import UserError
from moetrain.launch.cli import add_launch_parser, run_launch


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML job config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetrain", description="Mixture-of-Experts training with DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (plain process, torchrun, deepspeed launcher or srun)")
    _add_config_args(p)
    p = sub.add_parser("prepare", help="tokenize the configured data into its token store (docs/data.md), then exit")
    _add_config_args(p)
    p.add_argument("--source", default=None, help="only this source of data.sources (its index or name)")
    p = sub.add_parser("tokenizer", help="tokenizer tools (docs/data.md, 'Tokenizers')")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="train a byte-level BPE on the configured data into data.cache_dir/tokenizers/")
    _add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=None, help="tokens (default: data.tokenizer.vocab_size)")
    p.add_argument("--out", default=None, help="also copy the tokenizer.json here (a .json file, or a folder)")
    p = sub.add_parser("validate", help="check a config (and the parallel layout) without training")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=None, help="also check the layout for this many ranks")
    p = sub.add_parser("report", help="draw PNG plots (loss, expert load, fluctuation) of a run directory")
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    add_launch_parser(sub)
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from moetrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None:
        cfg.check_world_size(args.world_size)
    where = f" for world size {args.world_size}" if args.world_size else ""
    print(f"config ok{where}: {args.config}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from moetrain import data
    from moetrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    data.check_data_reachable(cfg.data)
    data.prepare_data(cfg.data, log=lambda line: print(line, flush=True), only=args.source)
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    """``moetrain tokenizer train``: the tokenizer ``data.tokenizer: {train: bpe, vocab_size: N}`` names,
    trained (once) where ``prepare`` / ``train`` will look for it."""
    import shutil
    from pathlib import Path

    from pydantic import ValidationError

    from moetrain import data
    from moetrain.config import load_config
    from moetrain.config.data import TrainedTokenizerConfig
    from moetrain.data.bpe import ensure_bpe
    from moetrain.data.sources import check_all_contents

    cfg = load_config(args.config, args.overrides)
    spec = cfg.data.tokenizer.model_dump() if isinstance(cfg.data.tokenizer, TrainedTokenizerConfig) else None
    if spec is None and args.vocab_size is None:
        raise UserError("tokenizer train: --vocab-size is required (data.tokenizer is not {train: bpe, ...})")
    spec = {**(spec or {"train": "bpe"}), **({} if args.vocab_size is None else {"vocab_size": args.vocab_size})}
    try:
        spec = TrainedTokenizerConfig.model_validate(spec)
    except ValidationError as exc:  # only --vocab-size can be wrong here: the config was validated
        raise UserError(f"--vocab-size {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    data.check_data_reachable(cfg.data)
    check_all_contents(cfg.data)  # before anything is written
    path = ensure_bpe(cfg.data, spec, log=lambda line: print(line, flush=True))
    if args.out is not None:
        out = Path(args.out)
        out = out if out.suffix == ".json" and not out.is_dir() else out / "tokenizer.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        print(f"copied to {out}")
    fields = ", ".join(f"{k}: {v}" for k, v in spec.model_dump(exclude_defaults=True).items())
    print(f"use it with data.tokenizer={{{fields}}} (found in data.cache_dir) or data.tokenizer={path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moetrain.report import make_report

    for path in make_report(Path(args.run_dir)):
        print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from moetrain.config import load_config
    from moetrain.training.run_dir import check_run_dir_writable

    cfg = load_config(args.config, args.overrides)
    check_run_dir_writable(cfg.resolved_run_dir)  # first: before data, model or DeepSpeed setup
    _prepare_process_env()
    from moetrain.parallel.layout import ParallelLayout, env_rank_world
    from moetrain.training.trainer import Trainer

    cfg.check_world_size(env_rank_world()[1])  # the layout against the launcher's world size
    layout = ParallelLayout.init(cfg.ep_size, timeout_s=cfg.train.collective_timeout_s)
    trainer = Trainer(cfg, layout)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher prepends --local_rank=N; the rank is read from the environment instead.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may come after flags (argparse then leaves them in `unknown`)
    overrides = [u for u in unknown if "=" in u and (u.startswith("--") or not u.startswith("-"))]
    bad = [u for u in unknown if u not in overrides]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    commands = {
        "train": cmd_train,
        "prepare": cmd_prepare,
        "tokenizer": cmd_tokenizer,
        "validate": cmd_validate,
        "report": cmd_report,
    }
    try:
        if args.command in commands:
            return commands[args.command](args)
        return run_launch(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``moetrain`` command and ``python -m moetrain.cli``.

    NOTE: after a multi-process run has finished and closed its files, a gloo rank intermittently
    aborted while the interpreter tore down ("terminate called without an active exception", seen in
    3 of the last 4 full test runs, every assertion passed), which turns a finished job into a failed
    one under torchrun. The cause is not found; so a process that joined a process group leaves with
    ``os._exit`` after flushing, skipping the C++ teardown.
    """
    code = main()
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
