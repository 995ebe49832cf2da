"""``moetrain import SRC RUN_DIR [key=value ...]``: a Hugging Face model folder as a moetrain run directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "import",
        help="a local Hugging Face model folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) as a run "
        "directory: config.yaml, a step-0 checkpoint, the tokenizer (docs/import.md)",
    )
    p.add_argument("src", help="the model folder: config.json, *.safetensors (with or without an index), tokenizer")
    p.add_argument("run_dir", help="the run directory to create (new or empty)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="training settings for config.yaml, e.g. train.steps=100 optim.lr=1e-5 data.paths=[corpus.txt] "
        "moe.expert_parallel_size=2 (the model itself is the source's)",
    )
    p.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> int:
    from moetrain.hf.import_run import import_hf

    import_hf(Path(args.src), Path(args.run_dir), args.overrides, log=lambda line: print(line, flush=True))
    return 0
