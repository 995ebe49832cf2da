"""The ``moetrain`` subcommands, one module per job (``moetrain/cli.py`` assembles them).

Each module has ``add_parsers(subparsers)``, which adds its subcommand(s) and sets ``run`` (a function
``args -> exit code``) as the parser's default. Heavy imports happen inside ``run``, so ``moetrain
--help`` and a bad config answer fast.
"""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML job config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
