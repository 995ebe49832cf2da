"""``moetrain train | prepare | tokenizer train | validate | plan | eval | generate | export | launch`` — the thin entry point.

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
    p.add_argument("--gpu-memory", default=None, help="warn when the planned memory per GPU exceeds this, e.g. 80GB")
    _add_plan_parser(sub)
    p = sub.add_parser(
        "report",
        help="draw PNG plots (loss, expert load, routing, fluctuation) of run directories; with two or more, "
        "also overlay their validation-loss curves",
    )
    p.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directories holding metrics.jsonl")
    p.add_argument(
        "--out", default="val_loss_overlay.png", help="the overlay PNG (two or more runs; default: %(default)s)"
    )
    _add_inference_parsers(sub)
    add_launch_parser(sub)
    return parser


def _quiet_cpu_accelerator() -> None:
    """eval / generate / export import DeepSpeed (through the checkpoint code) but never start it: name
    its accelerator on a machine without CUDA so it does not probe and warn."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _add_inference_parsers(sub) -> None:
    where = "a run directory (its newest committed checkpoint) or a checkpoints/step_NNNNNN folder"
    over = "key.path=value overrides that keep the model (e.g. data.cache_dir=..., moe.router.eval_routing=backbone)"
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint (one process, any layout)")
    p.add_argument("checkpoint", help=where)
    p.add_argument("overrides", nargs="*", help=over)
    p.add_argument(
        "--data", nargs="+", default=None, help="files, folders or globs to evaluate (default: the val split)"
    )
    p.add_argument("--max-batches", type=int, default=None, help="--data: evaluate at most this many micro-batches")
    p.add_argument("--out", default=None, help="the JSON result (default: RUN_DIR/eval/step_NNNNNN[_files].json)")
    p = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache, streamed to the terminal")
    p.add_argument("checkpoint", help=where)
    p.add_argument("overrides", nargs="*", help=over)
    p.add_argument("--prompt", default="", help="the text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens of this total mass")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder (safetensors)")
    p.add_argument("checkpoint", help=where)
    p.add_argument("out_dir", help="the folder to write (created; must not hold files)")
    p.add_argument("overrides", nargs="*", help=over)
    p.add_argument(
        "--format", choices=["hf"], default="hf", help="hf: config.json, safetensors shards, tokenizer files"
    )
    p.add_argument(
        "--target",
        choices=["auto", "mixtral", "remote-code"],
        default="auto",
        help="auto: native MixtralForCausalLM where the model's math is Mixtral's, else remote code",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 200MB")


def cmd_validate(args: argparse.Namespace) -> int:
    from moetrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None:
        cfg.check_world_size(args.world_size)
    if args.gpu_memory is not None:
        from moetrain.planning.units import parse_size

        parse_size(args.gpu_memory, "--gpu-memory")  # before anything heavy
    _quiet_cpu_accelerator()
    from moetrain.data.vocab import with_vocab_size
    from moetrain.planning.command import memory_lines
    from moetrain.training.offload import check_offload

    check_offload(cfg)
    where = f" for world size {args.world_size}" if args.world_size else ""
    print(f"config ok{where}: {args.config}")
    try:
        cfg = with_vocab_size(cfg)
    except UserError as exc:  # a hub tokenizer not cached here: no estimate, the config is still fine
        print(f"memory estimate skipped: {exc}")
        return 0
    for line in memory_lines(cfg, args.world_size or 1, args.gpu_memory):
        print(line)
    return 0


def _add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory of a job, itemised, and the layouts that fit, best first (docs/parallelism.md)",
    )
    _add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1); world size = nodes x gpus")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB; GB = GiB here)")
    p.add_argument(
        "--imbalance", type=float, default=2.0, help="the busiest EP rank receives this many times the mean rows"
    )
    p.add_argument("--overhead", default="2GB", help="fixed per-GPU overhead: CUDA context, NCCL, slack")
    p.add_argument("--top", type=int, default=10, help="how many fitting layouts to list")


def cmd_plan(args: argparse.Namespace) -> int:
    from moetrain.config import load_config

    # logging does not change memory; a config that enables wandb plans without wandb installed
    cfg = load_config(args.config, [*args.overrides, "logging.wandb.enabled=false"])
    from moetrain.planning.request import check_request

    request = check_request(cfg, args.gpus, args.nodes, args.gpu_memory, args.imbalance, args.overhead, args.top)
    _quiet_cpu_accelerator()
    from moetrain.data.vocab import with_vocab_size
    from moetrain.planning.command import plan
    from moetrain.training.offload import check_offload, cpu_adam_problem

    check_offload(cfg)
    cfg = with_vocab_size(cfg)
    print("\n".join(plan(cfg, request, cpu_adam_problem())))
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

    from moetrain.report import make_overlay, make_report

    run_dirs = [Path(d) for d in args.run_dirs]
    for run_dir in run_dirs:
        for path in make_report(run_dir):
            print(f"wrote {path}")
    if len(run_dirs) > 1:
        print(f"wrote {make_overlay(run_dirs, Path(args.out))}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _quiet_cpu_accelerator()
    import json
    import re
    from pathlib import Path

    from moetrain.inference import evaluate, loading, text

    paths = args.data
    if paths:  # nargs="+" swallows key=value overrides written after --data
        is_override = [bool(re.match(r"^-*[A-Za-z_][\w.]*=", a)) and not Path(a).exists() for a in paths]
        args.overrides += [a for a, o in zip(paths, is_override) if o]
        paths = [a for a, o in zip(paths, is_override) if not o]
    loaded = loading.load_checkpoint(args.checkpoint, args.overrides)
    tok = text.run_tokenizer(loaded.cfg.data, loaded.state.get("data_fingerprint"))
    name = f"step_{loaded.step:06d}{'_files' if paths else ''}.json"
    out = Path(args.out) if args.out else loaded.run_dir / "eval" / name
    _check_writable_file(out, "--out")
    if paths:
        result = evaluate.evaluate_files(loaded, tok, paths, args.max_batches)
    else:
        result = evaluate.evaluate_val(loaded, tok, log=lambda line: print(line, flush=True))
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    print(
        f"step {result.step} | {result.data} | {result.tokens} tokens | loss {result.loss:.4f} | "
        f"ppl {result.perplexity:.2f} | bits/byte {bpb}"
    )
    if result.logged_val_loss is not None:
        print(f"training logged val_loss {result.logged_val_loss:.4f} at step {result.step}")
    out.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _check_writable_file(path, flag: str) -> None:
    """Create the file's folder and make sure a file can be written there, before any work."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise UserError(f"{flag}: cannot write {str(path)!r} ({exc.strerror}); give a writable path") from None


def cmd_generate(args: argparse.Namespace) -> int:
    _quiet_cpu_accelerator()
    from moetrain.inference import generate, loading, text

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")
    if args.temperature < 0:
        raise UserError(f"--temperature ({args.temperature}) must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k ({args.top_k}) must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p ({args.top_p}) must be in (0, 1]")
    loaded = loading.load_checkpoint(args.checkpoint, args.overrides)
    if loaded.cfg.moe is not None and loaded.cfg.moe.router.kind == "expert_choice":
        raise UserError(
            "generate: expert-choice routing picks tokens from whole sequences (not causal), so it cannot "
            "route one new token at a time; evaluate the model with `moetrain eval` instead"
        )
    tok = text.run_tokenizer(loaded.cfg.data, loaded.state.get("data_fingerprint"))
    sampling = generate.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    stream = tok.stream()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def show(token: int) -> None:
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    generate.generate(loaded.model, tok.encode(args.prompt), sampling, tok.eos_id, on_token=show)
    sys.stdout.write(stream.flush() + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_cpu_accelerator()
    from pathlib import Path

    from moetrain.export import export_hf

    for line in export_hf(args.checkpoint, Path(args.out_dir), args.target, args.max_shard_size, args.overrides):
        print(line, flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from moetrain.config import load_config
    from moetrain.training.run_dir import check_run_dir_writable

    cfg = load_config(args.config, args.overrides)
    check_run_dir_writable(cfg.resolved_run_dir)  # first: before data, model or DeepSpeed setup
    _prepare_process_env()
    from moetrain.training.offload import check_offload

    check_offload(cfg)  # DeepSpeed's CPU Adam must be buildable before anything heavy starts
    from moetrain.parallel.layout import ParallelLayout, env_rank_world
    from moetrain.training.trainer import Trainer

    cfg.check_world_size(env_rank_world()[1])  # the layout against the launcher's world size
    hierarchical = cfg.moe is not None and cfg.moe.dispatch == "hierarchical"
    layout = ParallelLayout.init(cfg.ep_size, timeout_s=cfg.train.collective_timeout_s, hierarchical=hierarchical)
    _print_placement(layout, hierarchical)
    trainer = Trainer(cfg, layout)
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
        "plan": cmd_plan,
        "report": cmd_report,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "export": cmd_export,
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
