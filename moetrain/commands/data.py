"""``moetrain prepare`` and ``moetrain tokenizer train``: the data before training (docs/data.md)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from moetrain.commands import add_config_args
from moetrain.errors import UserError


def add_parsers(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize the configured data into its token store (docs/data.md), then exit")
    add_config_args(p)
    p.add_argument("--source", default=None, help="only this source of data.sources (its index or name)")
    p.set_defaults(run=run_prepare)
    p = sub.add_parser("tokenizer", help="tokenizer tools (docs/data.md, 'Tokenizers')")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="train a byte-level BPE on the configured data into data.cache_dir/tokenizers/")
    add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=None, help="tokens (default: data.tokenizer.vocab_size)")
    p.add_argument("--out", default=None, help="also copy the tokenizer.json here (a .json file, or a folder)")
    p.set_defaults(run=run_tokenizer_train)


def run_prepare(args: argparse.Namespace) -> int:
    from moetrain import data
    from moetrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    data.check_data_reachable(cfg.data)
    data.prepare_data(cfg.data, log=lambda line: print(line, flush=True), only=args.source)
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    """The tokenizer ``data.tokenizer: {train: bpe, vocab_size: N}`` names, trained (once) where
    ``prepare`` / ``train`` will look for it."""
    from moetrain import data
    from moetrain.config import load_config
    from moetrain.data.bpe import ensure_bpe
    from moetrain.data.sources import check_all_contents

    cfg = load_config(args.config, args.overrides)
    spec = _tokenizer_spec(cfg, args.vocab_size)
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


def _tokenizer_spec(cfg, vocab_size: int | None):
    """The BPE to train: the config's ``data.tokenizer`` spec with ``--vocab-size`` applied."""
    from pydantic import ValidationError

    from moetrain.config.data import TrainedTokenizerConfig

    spec = cfg.data.tokenizer.model_dump() if isinstance(cfg.data.tokenizer, TrainedTokenizerConfig) else None
    if spec is None and vocab_size is None:
        raise UserError("tokenizer train: --vocab-size is required (data.tokenizer is not {train: bpe, ...})")
    spec = {**(spec or {"train": "bpe"}), **({} if vocab_size is None else {"vocab_size": vocab_size})}
    try:
        return TrainedTokenizerConfig.model_validate(spec)
    except ValidationError as exc:  # only --vocab-size can be wrong here: the config was validated
        raise UserError(f"--vocab-size {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
