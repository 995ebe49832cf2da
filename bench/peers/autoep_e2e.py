"""End-to-end training tokens/s: moetrain's trainer vs DeepSpeed AutoEP on the same Mixtral-shaped model.

    python bench/peers/autoep_e2e.py                          # 1 and 2 threads, EP 2; 8/32 experts, top-1/2
    python bench/peers/autoep_e2e.py --allocator retained     # both sides keep freed memory (moetrain's default)
    python bench/peers/autoep_e2e.py --shapes 'top2-e8-*' --reps 5
    python bench/peers/autoep_e2e.py --quick                  # 1 shape, 1 rep, 12 steps: a smoke test
                                                              # (tests/test_bench_peers.py runs it)

AutoEP is part of DeepSpeed 0.19.8, which moetrain depends on; the Hugging Face model needs
``transformers`` (5.24.0 tested, in moetrain's ``test`` extra): no further environment.

Each side is a separate process per repetition, run A, B, A, B, ... after a short warm-up round:

- **moetrain**: ``moetrain train configs/llama_tiny.yaml MODEL...`` (its Llama backbone with
  Mixtral's MoE: SwiGLU experts in every block, top-k softmax router with renormalised gates);
  tokens/s from the per-step ``tokens_per_s`` of ``metrics.jsonl``.
- **autoep**: ``bench/peers/autoep_train.py`` (see its docstring): the same model exported with
  moetrain's Mixtral export and loaded as ``MixtralForCausalLM``, trained by ``deepspeed.initialize``
  with ``expert_parallel`` (AutoEP, preset ``mixtral``), on the same batches, from the same weights.

Both sides: the same ZeRO stage (``--zero``, default 1; on one process in fp32 moetrain runs ZeRO-1/2
as stage 0, recorded per row as ``moetrain_runs_stage0``; ``--override train.zero_on_one_process=true``
keeps ZeRO's machinery, docs/parallelism.md), fp32 (``--precision``), AdamW with moetrain's
groups and schedule, gradient clipping at ``optim.grad_clip``, no router loss
(``moe.router.load_balance_coeff=0``: AutoEP has none; Mixtral's is off by default), and the same
allocator setting (``--allocator``: ``glibc`` = glibc's defaults on both sides,
``train.retain_host_memory=false`` for moetrain; ``retained`` = both keep freed memory, moetrain's
default). The script asserts equal parameter counts and equal step-1 losses (relative 1e-5 in fp32,
2e-2 in bf16). EP shapes run 2 processes of one thread under ``torch.distributed.run``
(``moe.expert_parallel_size=2`` / ``autoep_size=2``). Besides the ratio of the medians, each row keeps
the ratio of every repetition's pair (``paired_ratios``, printed as their range): on a noisy machine
their spread is the uncertainty of the row. Writes bench/results/autoep_e2e.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.common import env_info, fmt_table, write_json  # noqa: E402
from bench.e2e_lm import QUIET_RUN, Run, Shape, prepare_data, run_moetrain, run_process, steady_tokens_per_s  # noqa: E402

CONFIG = REPO / "configs" / "llama_tiny.yaml"
SEED = 0
MODEL = [
    f"seed={SEED}",
    "train.micro_batch_size=8",
    "moe.router.load_balance_coeff=0",
    "moe.fluctuation.interval=0",
]
FULL_SHAPES = [Shape(k, e, t, 1) for k in (1, 2) for e in (8, 32) for t in (1, 2)] + [
    Shape(k, e, 1, 2) for k in (1, 2) for e in (8, 32)
]
QUICK_SHAPES = [Shape(2, 8, 1, 1)]
FIRST_LOSS_RTOL = {"fp32": 1e-5, "bf16": 2e-2}


def shape_overrides(shape: Shape, steps: int) -> list[str]:
    return [
        f"moe.num_experts={shape.experts}",
        f"moe.router.top_k={shape.top_k}",
        f"moe.expert_parallel_size={shape.procs}",
        f"train.steps={steps}",
    ]


def run_autoep(shape: Shape, overrides: list[str], work: Path, warmup: int, timeout_s: float, retain: bool):
    result = work / "autoep.json"
    result.unlink(missing_ok=True)
    script = REPO / "bench" / "peers" / "autoep_train.py"
    cmd = [*shape.launcher(), str(script), str(CONFIG), *overrides, "--result", str(result)]
    if retain:
        cmd.append("--retain-host-memory")
    rss, wall, cpu = run_process(cmd, shape, work / "autoep.log", timeout_s)
    out = json.loads(result.read_text())
    steps = out.pop("steps")
    return Run(steady_tokens_per_s(steps, warmup), rss, steps[0]["loss"], steps[-1]["loss"], wall, cpu), out


def measure(shape: Shape, args, common: list[str], work: Path) -> dict:
    base = [*common, *shape_overrides(shape, args.steps)]
    mt_runs, ae_runs, info = [], [], {}
    for rep in range(args.reps):
        mt_runs.append(run_moetrain(shape, base, work, args.warmup, args.timeout, config=CONFIG))
        run, info = run_autoep(shape, base, work, args.warmup, args.timeout, args.allocator == "retained")
        ae_runs.append(run)
        print(f"  {shape.name} rep {rep + 1}/{args.reps}: moetrain {mt_runs[-1].tokens_per_s:.0f}, "
              f"autoep {run.tokens_per_s:.0f} tokens/s", flush=True)  # fmt: skip
    rel = abs(mt_runs[0].first_loss - ae_runs[0].first_loss) / abs(ae_runs[0].first_loss)
    if rel > FIRST_LOSS_RTOL[args.precision]:
        raise RuntimeError(f"{shape.name}: step-1 losses differ (moetrain {mt_runs[0].first_loss}, "
                           f"autoep {ae_runs[0].first_loss}): not the same model or batch")  # fmt: skip
    med = {name: statistics.median(r.tokens_per_s for r in runs) for name, runs in (("mt", mt_runs), ("ae", ae_runs))}
    # each repetition's pair (moetrain then AutoEP, run back to back): their spread shows the machine's noise
    paired = [m.tokens_per_s / a.tokens_per_s for m, a in zip(mt_runs, ae_runs)]
    return {
        "shape": shape.name, "top_k": shape.top_k, "experts": shape.experts, "threads": shape.threads,
        "processes": shape.procs, "moetrain_tokens_per_s": med["mt"], "autoep_tokens_per_s": med["ae"],
        "ratio": med["mt"] / med["ae"], "paired_ratios": paired,
        "moetrain_first_loss": mt_runs[0].first_loss, "autoep_first_loss": ae_runs[0].first_loss,
        "moetrain_final_loss": statistics.median(r.final_loss for r in mt_runs),
        "autoep_final_loss": statistics.median(r.final_loss for r in ae_runs),
        "moetrain_peak_rss_mb": statistics.median(r.peak_rss_mb for r in mt_runs),
        "autoep_peak_rss_mb": statistics.median(r.peak_rss_mb for r in ae_runs),
        "params_moetrain": info["params_moetrain"], "params_autoep": info["params_autoep"],
        "moetrain_runs_stage0": runs_stage0(shape, common),
        "reps": {"moetrain": [r.__dict__ for r in mt_runs], "autoep": [r.__dict__ for r in ae_runs]},
    }  # fmt: skip


def runs_stage0(shape: Shape, common: list[str]) -> bool:
    """Whether moetrain's trainer ran the asked ZeRO-1/2 as stage 0 (docs/parallelism.md): its own rule,
    on the config this shape trains with."""
    from moetrain.config import load_config
    from moetrain.training.engine import unpartitioned

    return unpartitioned(load_config(str(CONFIG), [*common, *shape_overrides(shape, 1)]), shape.procs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 shape, 1 rep, 12 steps")
    p.add_argument("--shapes", nargs="+", default=None, help="names or globs: top{1,2}-e{8,32}-{1t,2t,ep2}")
    p.add_argument("--reps", type=int, default=None, help="repetitions per side (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; --quick 12)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 6; --quick 4)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=1, help="ZeRO stage, both sides")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--allocator", choices=("glibc", "retained"), default="glibc", help="both sides")
    p.add_argument(
        "--override", nargs="+", action="append", default=[], metavar="KEY=VALUE",
        help="overrides for both sides, after the model's (e.g. data.cache_dir=DIR data.max_tokens=200000)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "autoep_e2e.json"))
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.steps = args.steps or (12 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (4 if args.quick else 6)
    patterns = args.shapes or [s.name for s in (QUICK_SHAPES if args.quick else FULL_SHAPES)]
    args.shape_list = [s for s in FULL_SHAPES if any(fnmatch.fnmatch(s.name, x) for x in patterns)]
    if not args.shape_list:
        p.error(f"--shapes {args.shapes} matches none of {[s.name for s in FULL_SHAPES]}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, started = os.getloadavg(), time.perf_counter()
    common = [
        *MODEL, f"train.precision={args.precision}", *QUIET_RUN,
        f"deepspeed.zero_optimization={{stage: {args.zero}}}",
        f"train.retain_host_memory={'true' if args.allocator == 'retained' else 'false'}",
        *(o for group in args.override for o in group),
    ]  # fmt: skip
    common.append(f"data.cache_dir={prepare_data(common, CONFIG)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="autoep_e2e_") as tmp:
        work = Path(tmp)
        first = args.shape_list[0]  # warm-up round: caches, extension builds; not recorded
        warm = [*common, *shape_overrides(first, 3)]
        run_moetrain(first, warm, work, 0, args.timeout, config=CONFIG)
        run_autoep(first, warm, work, 0, args.timeout, args.allocator == "retained")
        for shape in args.shape_list:
            rows.append(measure(shape, args, common, work))
    elapsed = time.perf_counter() - started
    table = [
        [r["shape"], f"{r['threads']} x {r['processes']}", f"{r['moetrain_tokens_per_s']:.0f}",
         f"{r['autoep_tokens_per_s']:.0f}", f"{r['ratio']:.2f}",
         f"{min(r['paired_ratios']):.2f}-{max(r['paired_ratios']):.2f}", f"{r['moetrain_first_loss']:.6f}",
         f"{r['autoep_first_loss']:.6f}", f"{r['moetrain_peak_rss_mb']:.0f}", f"{r['autoep_peak_rss_mb']:.0f}"]
        for r in rows
    ]  # fmt: skip
    header = ["shape", "threads x procs", "moetrain tok/s", "autoep tok/s", "moetrain/autoep", "per-rep pairs",
              "step-1 loss moetrain",
              "step-1 loss autoep", "RSS moetrain MB", "RSS autoep MB"]  # fmt: skip
    print(fmt_table(table, header))
    env = env_info(torch.device("cpu"))
    import transformers

    env["transformers"] = transformers.__version__
    path = write_json(
        args.out,
        {
            "benchmark": "autoep_e2e", "env": env, "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(), "elapsed_s": elapsed, "config": str(CONFIG.relative_to(REPO)),
            "overrides_both_sides": common, "seed": SEED, "steps": args.steps, "warmup_steps": args.warmup,
            "reps": args.reps, "zero_stage": args.zero, "precision": args.precision, "allocator": args.allocator,
            "rows": rows,
        },
    )  # fmt: skip
    print(f"wrote {path} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
