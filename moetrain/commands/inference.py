"""``moetrain eval | generate | export``: a trained checkpoint, loaded on one process (no DeepSpeed)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from moetrain.errors import UserError

WHERE = "a run directory (its newest committed checkpoint) or a checkpoints/step_NNNNNN folder"
OVERRIDES = "key.path=value overrides that keep the model (e.g. data.cache_dir=..., moe.router.eval_routing=backbone)"


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint (one process, any layout)")
    p.add_argument("checkpoint", help=WHERE)
    p.add_argument("overrides", nargs="*", help=OVERRIDES)
    p.add_argument(
        "--data", nargs="+", default=None, help="files, folders or globs to evaluate (default: the val split)"
    )
    p.add_argument("--max-batches", type=int, default=None, help="--data: evaluate at most this many micro-batches")
    p.add_argument("--out", default=None, help="the JSON result (default: RUN_DIR/eval/step_NNNNNN[_files].json)")
    p.set_defaults(run=run_eval)
    p = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache, streamed to the terminal")
    p.add_argument("checkpoint", help=WHERE)
    p.add_argument("overrides", nargs="*", help=OVERRIDES)
    p.add_argument("--prompt", default="", help="the text to continue (default: a new document)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user message: rendered with the chat template (data.chat_template or the "
        "tokenizer's) and its generation prompt; the reply stops at the template's end-of-turn",
    )
    p.add_argument("--system", default=None, help="--chat: a system message before the prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens of this total mass")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_generate)
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder (safetensors)")
    p.add_argument("checkpoint", help=WHERE)
    p.add_argument("out_dir", help="the folder to write (created; must not hold files)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES)
    p.add_argument(
        "--format", choices=["hf"], default="hf", help="hf: config.json, safetensors shards, tokenizer files"
    )
    p.add_argument(
        "--target",
        choices=["auto", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "remote-code"],
        default="auto",
        help="auto: an imported run's own family (its transformers class, no remote code); otherwise native "
        "MixtralForCausalLM where the model's math is Mixtral's, else remote code. A family name: that class "
        "(refused, naming why, when it does not compute the model)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 200MB")
    p.set_defaults(run=run_export)


def run_eval(args: argparse.Namespace) -> int:
    from moetrain.inference import evaluate, loading, text

    paths, args.overrides = _split_data_args(args.data, args.overrides)
    loaded = loading.load_checkpoint(args.checkpoint, args.overrides)
    tok = text.run_tokenizer(loaded.cfg.data, loaded.state.get("data_store") or loaded.state.get("data_fingerprint"))
    name = f"step_{loaded.step:06d}{'_files' if paths else ''}.json"
    out = Path(args.out) if args.out else loaded.run_dir / "eval" / name
    _check_writable_file(out, "--out")
    if paths:
        result = evaluate.evaluate_files(loaded, tok, paths, args.max_batches)
    else:
        result = evaluate.evaluate_val(loaded, tok, log=lambda line: print(line, flush=True))
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    what = "masked loss" if result.masked else "loss"
    print(
        f"step {result.step} | {result.data} | {result.tokens} tokens | {what} {result.loss:.4f} | "
        f"ppl {result.perplexity:.2f} | bits/byte {bpb}"
    )
    if result.masked:
        print(
            f"masked: the loss counts the {result.tokens} target tokens of the loss mask only (chat: the assistant's "
            "tokens; prompt-completion: the completion; document masking: within each document)"
        )
    if result.logged_val_loss is not None:
        print(f"training logged val_loss {result.logged_val_loss:.4f} at step {result.step}")
    out.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _split_data_args(paths: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """``--data`` (nargs="+") swallows key=value overrides written after it: give them back."""
    if not paths:
        return paths, overrides
    is_override = [bool(re.match(r"^-*[A-Za-z_][\w.]*=", a)) and not Path(a).exists() for a in paths]
    return [a for a, o in zip(paths, is_override) if not o], overrides + [a for a, o in zip(paths, is_override) if o]


def _check_writable_file(path: Path, flag: str) -> None:
    """Create the file's folder and make sure a file can be written there, before any work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise UserError(f"{flag}: cannot write {str(path)!r} ({exc.strerror}); give a writable path") from None


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")
    if args.temperature < 0:
        raise UserError(f"--temperature ({args.temperature}) must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k ({args.top_k}) must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p ({args.top_p}) must be in (0, 1]")


def run_generate(args: argparse.Namespace) -> int:
    from moetrain.inference import generate, loading, text

    _check_sampling(args)
    loaded = loading.load_checkpoint(args.checkpoint, args.overrides)
    if loaded.cfg.moe is not None and loaded.cfg.moe.router.kind == "expert_choice":
        raise UserError(
            "generate: expert-choice routing picks tokens from whole sequences (not causal), so it cannot "
            "route one new token at a time; evaluate the model with `moetrain eval` instead"
        )
    if args.system is not None and not args.chat:
        raise UserError("--system is a message of a chat: add --chat")
    tok = text.run_tokenizer(loaded.cfg.data, loaded.state.get("data_store") or loaded.state.get("data_fingerprint"))
    sampling = generate.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.chat:
        return _generate_chat(args, loaded, tok, sampling)
    stream = tok.stream()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def show(token: int) -> None:
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    generate.generate(loaded.model, tok.encode(args.prompt), sampling, tok.eos_id, on_token=show)
    sys.stdout.write(stream.flush() + "\n")
    return 0


def _generate_chat(args: argparse.Namespace, loaded, tok, sampling) -> int:
    """The reply to ``--prompt`` as a user message (after ``--system``), rendered with the run's chat template
    and its generation prompt; shown as it streams, up to the template's end-of-turn marker."""
    from moetrain.data.chat_template import data_chat_template
    from moetrain.inference import generate

    template = data_chat_template(loaded.cfg.data.tokenizer, loaded.cfg.data.chat_template)
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
        {"role": "user", "content": args.prompt}
    ]
    prompt = template.render(messages, add_generation_prompt=True, where="--prompt")
    reply = generate.ReplyStream(tok.stream(), template.end_of_turn())

    def show(token: int) -> bool:
        sys.stdout.write(reply.push(token))
        sys.stdout.flush()
        return reply.done

    generate.generate(loaded.model, tok.encode(prompt), sampling, tok.eos_id, on_token=show)
    sys.stdout.write(reply.flush() + "\n")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from moetrain.export import export_hf

    for line in export_hf(args.checkpoint, Path(args.out_dir), args.target, args.max_shard_size, args.overrides):
        print(line, flush=True)
    return 0
