"""End-to-end training tokens/s of a small MoE LM: moetrain's trainer vs the same model on ``deepspeed.moe``.

    python bench/e2e_lm.py                       # full sweep: 12 shapes x 3 reps, ~15 min on 2 idle cores
    python bench/e2e_lm.py --quick               # 2 shapes (1 thread, EP 2), 1 rep, 12 steps: ~1 min
    python bench/e2e_lm.py --shapes 'top2-*' '*-ep2' --reps 5 --steps 60
    python bench/e2e_lm.py --capacity-factor 1.0 # capacity mode (default: dropless on both sides)
    python bench/e2e_lm.py --variant ckpt train.activation_checkpointing=moe   # an extra moetrain column
    python bench/e2e_lm.py --device cuda         # on one GPU: top{1,2}-e{8,32}-gpu, bf16 (scripts/gpu_check.sh)

Each side is a separate process per repetition, run A, B, A, B, ... after one short warm-up round:

- **moetrain**: ``python -m moetrain.cli train configs/tiny.yaml MODEL...`` (its own model, trainer and
  DeepSpeed engine); tokens/s from the per-step ``tokens_per_s`` of ``metrics.jsonl`` (logging.interval 1).
- **deepspeed**: ``bench/e2e_baseline.py`` with the same config and overrides: the same GPT-2 backbone
  whose MoE blocks are ``deepspeed.moe.layer.MoE``, in a plain DeepSpeed loop (see its docstring). It
  starts from moetrain's initial weights (same seed), asserts equal parameter counts, and reads the same
  batches from moetrain's token store.

The model (configs/tiny.yaml + ``MODEL``): GPT-2 backbone, 4 blocks, d_model 128, 4 heads, seq 128,
byte vocabulary, dense FFN 512 in blocks 1 and 3, a top-k softmax MoE with GELU experts of hidden 512 in
blocks 2 and 4; micro-batch 8 per process, fp32 (``--precision``), seed 0.

With ``--device cuda`` each side is one process on GPU 0 in bf16 (moetrain's grouped GEMM runs in bf16
on sm90; DeepSpeed's bf16 engine on the other side), timed per step after the GPU finished it; peak
RSS is then host memory only, and DeepSpeed's peak GPU memory is in the JSON. Otherwise both sides
run on the CPU (``CUDA_VISIBLE_DEVICES=""``) with the same ``OMP_NUM_THREADS``; EP shapes run
2 processes of 1 thread under ``torch.distributed.run`` with ``moe.expert_parallel_size=2`` (DeepSpeed:
``ep_size=2``). tokens/s = global tokens over the wall time of the steps after ``--warmup`` (data,
forward, backward, optimizer step); the table holds medians over repetitions and the ratio of the
medians (> 1: moetrain faster). A repetition is a whole process (start-up ~4-5 s), so the default is 3
of them, of 30 steps each, rather than the 11 of docs/benchmarks.md (``--reps 11``: ~50 min). Peak RSS
is ``ru_maxrss`` of the launched process from ``wait4``: for EP, the largest rank. For EP shapes it also
prints how unevenly moetrain's routing loaded the ranks (:func:`busiest_rank_load`). Writes
bench/results/e2e_lm.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if not torch.cuda.is_available():  # before deepspeed is imported (env_info): no accelerator probe
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.common import env_info, fmt_table, write_json  # noqa: E402
from moetrain.parallel.layout import LAUNCHER_VARS  # noqa: E402

CONFIG = REPO / "configs" / "tiny.yaml"
SEED = 0
# configs/tiny.yaml turned into a GPT-2 backbone with GELU top-k MoE FFNs in blocks 2 and 4
MODEL = [
    f"seed={SEED}",
    "model.d_model=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.d_ff=512",
    "model.max_seq_len=128",
    "moe.placement=replace_ffn",
    "moe.every=2",
    "moe.expert_type=gelu",
    "moe.expert_hidden=512",
    "moe.router.kind=topk",
    "moe.fluctuation.interval=0",
    "data.seq_len=128",
    "train.micro_batch_size=8",
]
# what the moetrain run does besides training: log every step, evaluate once (1 batch), never save
QUIET_RUN = [
    "train.eval_interval=0",
    "train.eval_batches=1",
    "checkpoint.interval=0",
    "checkpoint.save_at_end=false",
    "checkpoint.resume=none",
    "logging.interval=1",
    "logging.progress=off",
]


@dataclass(frozen=True)
class Shape:
    top_k: int
    experts: int
    threads: int  # per process
    procs: int  # > 1: expert parallelism over all of them
    device: str = "cpu"  # cuda: one process on one GPU, bf16

    @property
    def name(self) -> str:
        if self.device == "cuda":
            return f"top{self.top_k}-e{self.experts}-gpu"
        return f"top{self.top_k}-e{self.experts}-" + (f"ep{self.procs}" if self.procs > 1 else f"{self.threads}t")

    def overrides(self, capacity_factor: float | None, steps: int) -> list[str]:
        cf = "null" if capacity_factor is None else capacity_factor
        return [
            f"moe.num_experts={self.experts}",
            f"moe.router.top_k={self.top_k}",
            f"moe.router.renormalize={'true' if self.top_k > 1 else 'false'}",  # DeepSpeed's gates
            f"moe.expert_parallel_size={self.procs}",
            f"moe.capacity_factor={cf}",
            f"train.steps={steps}",
        ]

    def launcher(self) -> list[str]:
        """The head of the command line: a plain process, or torchrun for EP."""
        if self.procs == 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.procs}"]


FULL_SHAPES = [Shape(k, e, t, 1) for k in (1, 2) for e in (8, 32) for t in (1, 2)] + [
    Shape(k, e, 1, 2) for k in (1, 2) for e in (8, 32)
]
QUICK_SHAPES = [Shape(2, 8, 1, 1), Shape(2, 8, 1, 2)]  # a subset of FULL_SHAPES
GPU_SHAPES = [Shape(k, e, 1, 1, "cuda") for k in (1, 2) for e in (8, 32)]
GPU_QUICK_SHAPES = [Shape(2, 8, 1, 1, "cuda")]


@dataclass(frozen=True)
class Run:
    tokens_per_s: float
    peak_rss_mb: float
    first_loss: float
    final_loss: float
    wall_s: float  # the whole process: start-up, data, training, its end
    cpu_s: float
    busiest_rank_load: float | None = None  # moetrain under EP: see busiest_rank_load()


def run_process(cmd: list[str], shape: Shape, log: Path, timeout_s: float) -> tuple[float, float, float]:
    """Run ``cmd`` to the end; (its peak RSS in MB, wall seconds, CPU seconds). ``wait4`` gives the
    child's own ``ru_maxrss``, which the kernel raises to that of any child it waited for (torchrun's
    ranks), and CPU time summed over them."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS=str(shape.threads), MKL_NUM_THREADS=str(shape.threads), PYTHONUNBUFFERED="1")
    if shape.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"exit code {proc.returncode} after {wall:.0f} s: {' '.join(cmd)}\n{tail}")
    return usage.ru_maxrss / 1024, wall, usage.ru_utime + usage.ru_stime  # ru_maxrss: kB on Linux


def steady_tokens_per_s(steps: list[dict], warmup: int) -> float:
    """Tokens over wall time of the steps after the first ``warmup`` (records: tokens, time_s)."""
    steady = steps[warmup:] or steps[-1:]
    return sum(r["tokens"] for r in steady) / sum(r["time_s"] for r in steady)


def busiest_rank_load(records: list[dict], procs: int) -> float | None:
    """Expert rows on the busiest rank over the mean rank's, averaged over the steps and MoE layers of
    ``records`` (moetrain's per-step ``moe/layer*/load``: global rows per expert; rank r holds the r-th
    block of experts). 1.0: every rank computes as many rows; under EP the others wait for the busiest."""
    if procs == 1:
        return None
    shares = []
    for r in records:
        for key, load in r.items():
            if key.startswith("moe/layer") and key.endswith("/load"):
                per = len(load) // procs  # experts per rank
                per_rank = [sum(load[i : i + per]) for i in range(0, len(load), per)]
                shares.append(max(per_rank) * procs / sum(per_rank))
    return statistics.mean(shares) if shares else None


def run_moetrain(
    shape: Shape, overrides: list[str], work: Path, warmup: int, timeout_s: float, config: Path = CONFIG
) -> Run:
    run_dir = work / "moetrain_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [*shape.launcher(), "-m", "moetrain.cli", "train", str(config), *overrides, f"run_dir={run_dir}"]
    rss, wall, cpu = run_process(cmd, shape, work / "moetrain.log", timeout_s)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # logging.interval 1: each train record times one step (its metrics flush is outside the window);
    # its "tokens" is the running total
    train = [r for r in records if "tokens_per_s" in r]
    steps = []
    for prev, r in zip([0, *(r["tokens"] for r in train)], train):
        steps.append(
            {"loss": r["loss"], "tokens": r["tokens"] - prev, "time_s": (r["tokens"] - prev) / r["tokens_per_s"]}
        )
    steady = train[warmup:] or train[-1:]
    return Run(
        steady_tokens_per_s(steps, warmup), rss, steps[0]["loss"], steps[-1]["loss"], wall, cpu,
        busiest_rank_load(steady, shape.procs),
    )  # fmt: skip


def run_deepspeed(shape: Shape, overrides: list[str], work: Path, warmup: int, timeout_s: float) -> tuple[Run, dict]:
    result = work / "deepspeed.json"
    result.unlink(missing_ok=True)
    cmd = [*shape.launcher(), str(REPO / "bench" / "e2e_baseline.py"), str(CONFIG), *overrides, "--result", str(result)]
    rss, wall, cpu = run_process(cmd, shape, work / "deepspeed.log", timeout_s)
    out = json.loads(result.read_text())
    steps = out.pop("steps")
    return Run(steady_tokens_per_s(steps, warmup), rss, steps[0]["loss"], steps[-1]["loss"], wall, cpu), out


def median_of(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def measure(shape: Shape, args, common: list[str], variants: dict[str, list[str]], work: Path) -> list[dict]:
    """Interleaved reps of DeepSpeed and each moetrain variant; one row per variant."""
    base = [*common, *shape.overrides(args.capacity_factor, args.steps)]
    ds_runs: list[Run] = []
    mt_runs: dict[str, list[Run]] = {name: [] for name in variants}
    info: dict = {}
    for rep in range(args.reps):
        for name, extra in variants.items():
            mt_runs[name].append(run_moetrain(shape, [*base, *extra], work, args.warmup, args.timeout))
        run, info = run_deepspeed(shape, base, work, args.warmup, args.timeout)
        ds_runs.append(run)
        print(f"  {shape.name} rep {rep + 1}/{args.reps}: "
              + ", ".join(f"moetrain[{n}] {r[-1].tokens_per_s:.0f}" for n, r in mt_runs.items())
              + f", deepspeed {run.tokens_per_s:.0f} tokens/s", flush=True)  # fmt: skip
    rows = []
    for name, runs in mt_runs.items():
        mt, ds = median_of(runs, "tokens_per_s"), median_of(ds_runs, "tokens_per_s")
        rows.append({
            "shape": shape.name, "top_k": shape.top_k, "experts": shape.experts, "threads": shape.threads,
            "processes": shape.procs, "expert_parallel": shape.procs, "variant": name,
            "moetrain_tokens_per_s": mt, "deepspeed_tokens_per_s": ds, "ratio": mt / ds,
            "moetrain_peak_rss_mb": median_of(runs, "peak_rss_mb"),
            "deepspeed_peak_rss_mb": median_of(ds_runs, "peak_rss_mb"),
            "moetrain_final_loss": median_of(runs, "final_loss"),
            "moetrain_busiest_rank_load": (
                median_of(runs, "busiest_rank_load") if all(r.busiest_rank_load for r in runs) else None
            ),
            "deepspeed_final_loss": median_of(ds_runs, "final_loss"),
            "moetrain_first_loss": runs[0].first_loss, "deepspeed_first_loss": ds_runs[0].first_loss,
            "params_moetrain": info["params_moetrain"], "params_deepspeed": info["params_deepspeed"],
            "deepspeed_threads_seen": info["threads"],
            "deepspeed_device": info["device"], "deepspeed_peak_gpu_mb": info["peak_gpu_mb"],
            "reps": {"moetrain": [r.__dict__ for r in runs], "deepspeed": [r.__dict__ for r in ds_runs]},
        })  # fmt: skip
    return rows


def prepare_data(common: list[str], config: Path = CONFIG) -> str:
    """Prepare (or find) the token store once, here; returns the absolute data.cache_dir both sides use."""
    from moetrain import data
    from moetrain.config import load_config

    cfg = load_config(str(config), common)
    cache = Path(cfg.data.cache_dir)
    cache = cache if cache.is_absolute() else REPO / cache
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": str(cache)})})
    data.prepare_data(cfg.data, log=lambda line: print(line, flush=True))
    return str(cache)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 shapes, 1 rep, 12 steps: a smoke test")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="names or globs: top{1,2}-e{8,32}-{1t,2t,ep2}, e.g. top2-e8-1t '*-ep2' (default: all of the mode)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions per side (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; --quick 12)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 6; --quick 4)")
    p.add_argument("--capacity-factor", type=float, default=None, help="both sides (default: dropless)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cuda: one process per side on GPU 0 (shapes top{1,2}-e{8,32}-gpu), bf16 unless --precision",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default=None,
        help="both sides (default: fp32 on the CPU, bf16 on a GPU, where moetrain's grouped GEMM needs it)",
    )  # fmt: skip
    p.add_argument(
        "--variant", "--variants", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
        help="an extra moetrain column: a name and its overrides (repeatable); 'plain' is always run",
    )  # fmt: skip
    p.add_argument(
        "--override", nargs="+", action="append", default=[], metavar="KEY=VALUE",
        help="overrides for both sides, after the model's (e.g. data.cache_dir=DIR data.max_tokens=200000)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=900, help="seconds one process may run")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "e2e_lm.json"))
    args = p.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or (1 if quick else 3)
    args.steps = args.steps or (12 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (4 if quick else 6)
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    full, quick_shapes = (GPU_SHAPES, GPU_QUICK_SHAPES) if args.device == "cuda" else (FULL_SHAPES, QUICK_SHAPES)
    patterns = args.shapes or [s.name for s in (quick_shapes if quick else full)]
    args.shape_list = [s for s in full if any(fnmatch.fnmatch(s.name, x) for x in patterns)]
    if not args.shape_list:
        p.error(f"--shapes {args.shapes} matches none of {[s.name for s in full]}")
    args.variant_map = {"plain": [], **{v[0]: v[1:] for v in args.variant}}
    return args


def print_report(rows: list[dict]) -> None:
    header = ["shape", "variant", "threads x procs", "moetrain tok/s", "deepspeed tok/s", "moetrain/deepspeed",
              "RSS moetrain MB", "RSS deepspeed MB", "final loss moetrain", "final loss deepspeed"]  # fmt: skip
    table = [
        [r["shape"], r["variant"], f"{r['threads']} x {r['processes']}", f"{r['moetrain_tokens_per_s']:.0f}",
         f"{r['deepspeed_tokens_per_s']:.0f}", f"{r['ratio']:.2f}", f"{r['moetrain_peak_rss_mb']:.0f}",
         f"{r['deepspeed_peak_rss_mb']:.0f}", f"{r['moetrain_final_loss']:.3f}", f"{r['deepspeed_final_loss']:.3f}"]
        for r in rows
    ]  # fmt: skip
    print(fmt_table(table, header))
    for r in rows:  # the same model: equal parameters; dropless, the same step-1 loss
        if r["moetrain_busiest_rank_load"] is not None:
            print(
                f"{r['shape']} [{r['variant']}]: moetrain's busiest rank computes {r['moetrain_busiest_rank_load']:.2f}x "
                "the mean rank's expert rows (steady steps, all MoE layers)"
            )
        if r["variant"] != "plain":  # e.g. --variant bf16 train.precision=bf16: bf16 over fp32, one run
            plain = next(p for p in rows if p["shape"] == r["shape"] and p["variant"] == "plain")
            print(
                f"{r['shape']} [{r['variant']}]: {r['moetrain_tokens_per_s'] / plain['moetrain_tokens_per_s']:.2f}x "
                f"moetrain's plain tokens/s; final loss {r['moetrain_final_loss']:.4f} vs {plain['moetrain_final_loss']:.4f}"
            )
        if r["variant"] == "plain":
            print(
                f"{r['shape']}: parameters moetrain {r['params_moetrain']}, deepspeed {r['params_deepspeed']}; step-1 "
                f"loss moetrain {r['moetrain_first_loss']:.6f}, deepspeed {r['deepspeed_first_loss']:.6f}"
            )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, started = os.getloadavg(), time.perf_counter()
    common = [*MODEL, f"train.precision={args.precision}", *QUIET_RUN, *(o for group in args.override for o in group)]
    common.append(f"data.cache_dir={prepare_data(common)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="e2e_lm_") as tmp:
        work = Path(tmp)
        first = args.shape_list[0]  # warm-up round: caches, extension builds; not recorded
        warm = [*common, *first.overrides(args.capacity_factor, 3)]
        run_moetrain(first, warm, work, 0, args.timeout)
        run_deepspeed(first, warm, work, 0, args.timeout)
        for shape in args.shape_list:
            rows += measure(shape, args, common, args.variant_map, work)
    elapsed = time.perf_counter() - started
    print_report(rows)
    env = env_info(torch.device(args.device))
    env["cpu_threads"] = sorted({s.threads for s in args.shape_list})  # per process, from the shapes
    path = write_json(
        args.out,
        {
            "benchmark": "e2e_lm",
            "env": env,
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "elapsed_s": elapsed,
            "config": str(CONFIG.relative_to(REPO)),
            "overrides_both_sides": common,
            "variants": args.variant_map,
            "seed": SEED,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "reps": args.reps,
            "capacity_factor": args.capacity_factor,
            "device": args.device,
            "precision": args.precision,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rows": rows,
        },
    )
    print(f"wrote {path} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
