"""``moetrain train | prepare | tokenizer train | validate | plan | report | eval | generate | export | import
| upcycle | launch``: the thin entry point. Each subcommand lives in ``moetrain/commands/`` (``launch`` in
``launch/cli.py``).

Errors in user input (config, data, checkpoint, CLI) print one ``error:`` message and exit with code 2,
without a traceback.

Extending moetrain from a script of your own: register what you add (e.g. a router with
``moetrain.moe.routers.register_router``), then call :func:`main` or :func:`entry`; ``callbacks``
adds training callbacks (``moetrain.training.callbacks.Callback``) to ``moetrain train``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from moetrain.commands import check, data, hf_import, inference, plan, train, upcycle
from moetrain.errors import UserError
from moetrain.launch.cli import add_launch_parser, run_launch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetrain", description="Mixture-of-Experts training with DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    data.add_parsers(sub)
    check.add_parsers(sub)
    plan.add_parsers(sub)
    inference.add_parsers(sub)
    hf_import.add_parsers(sub)
    upcycle.add_parsers(sub)
    add_launch_parser(sub).set_defaults(run=run_launch)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also come after flags."""
    # The deepspeed launcher prepends --local_rank=N; the rank is read from the environment instead.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if "=" in u and (u.startswith("--") or not u.startswith("-"))]
    bad = [u for u in unknown if u not in overrides]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    return args


def main(argv: Sequence[str] | None = None, *, callbacks: list | None = None) -> int:
    """Run one command; returns its exit code. ``callbacks``: extra training callbacks for ``train``."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    args.callbacks = callbacks
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def entry(*, callbacks: list | None = None) -> None:
    """The ``moetrain`` command and ``python -m moetrain.cli``.

    NOTE: a gloo rank intermittently aborted while the interpreter tore down after a finished
    multi-process run ("terminate called without an active exception"; the cause is not found, see
    CHANGELOG), which would turn a finished job into a failed one under torchrun; so a process that
    joined a process group leaves with ``os._exit`` after flushing, skipping the C++ teardown.
    """
    code = main(callbacks=callbacks)
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
