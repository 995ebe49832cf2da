"""bf16 at ZeRO-0: DeepSpeed's ``FP16_UnfusedOptimizer.step`` against moetrain's grouped step, in one run.

    python bench/bf16_step.py                          # the 4 one-thread shapes of bench/e2e_lm.py, 60 steps
    python bench/bf16_step.py --shapes top2-e8-1t --steps 30
    python bench/bf16_step.py --quick                  # one shape, 8 steps: a smoke test

Each shape trains ``bench/e2e_lm.py``'s LM (``train.precision=bf16``, ZeRO-0, one process, one thread) in
a process of its own; within it the optimizer wrapper alternates every step between DeepSpeed's own
``step`` (even steps) and ``GroupedStepBf16.step`` (odd steps; ``moetrain/training/unfused_bf16.py``),
both on the same instance, so both see the same machine state. Reported: the median wall time of
``engine.step()`` for each after ``--warmup`` steps, the time saved, and the median whole training step
(forward, backward and optimizer step; the alternating run's, which is what the saving is a share of).
The two steps make the same update (bitwise without clipping; ``tests/test_unfused_bf16.py``), so the
run trains as either would. Writes bench/results/bf16_step.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.e2e_lm import CONFIG, FULL_SHAPES, MODEL, QUIET_RUN, prepare_data  # noqa: E402

SHAPES = {s.name: s for s in FULL_SHAPES if s.procs == 1 and s.threads == 1}


def child(args) -> None:
    """One shape's alternating run; prints one JSON line of step times."""
    import torch
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from moetrain.cli import main
    from moetrain.training.callbacks import Callback
    from moetrain.training.unfused_bf16 import grouped_step_class

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"deepspeed": [], "grouped": [], "train_step": []}

    class Alternate(Callback):
        def on_train_start(self, trainer) -> None:
            engine, optimizer = trainer.engine, trainer.engine.optimizer
            assert type(optimizer) is grouped_step_class(), type(optimizer)  # what moetrain runs
            step = engine.step

            def timed_step(*a, **k):
                grouped = trainer.state.step % 2 == 1
                optimizer.__class__ = grouped_step_class() if grouped else FP16_UnfusedOptimizer
                t0 = time.perf_counter()
                out = step(*a, **k)
                if trainer.state.step >= args.warmup:
                    times["grouped" if grouped else "deepspeed"].append(time.perf_counter() - t0)
                return out

            engine.step = timed_step

        def on_step_start(self, trainer, step) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, trainer, result) -> None:
            if result.step > args.warmup:
                times["train_step"].append(time.perf_counter() - self.t0)

    shape = SHAPES[args.child]
    overrides = [*args.common, *shape.overrides(None, args.steps), f"run_dir={args.run_dir}"]
    main(["train", str(CONFIG), *overrides], callbacks=[Alternate()])
    print("RESULT " + json.dumps(times), flush=True)


def run_shape(name: str, args, common: list[str], work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--run-dir", str(work / name), "--common", *common]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name}: the run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    times = json.loads(lines[-1][len("RESULT ") :])
    ds, grouped = (statistics.median(times[k]) * 1e3 for k in ("deepspeed", "grouped"))
    train = statistics.median(times["train_step"]) * 1e3
    return {
        "shape": name, "deepspeed_step_ms": ds, "grouped_step_ms": grouped, "saved_ms": ds - grouped,
        "deepspeed_over_grouped": ds / grouped, "train_step_ms": train, "saved_share_of_step": (ds - grouped) / train,
        "samples": {k: len(v) for k, v in times.items()}, "times_s": times,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"names or globs of {', '.join(SHAPES)}")
    p.add_argument("--quick", action="store_true", help="top1-e8-1t only, 8 steps: a smoke test")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per shape (default 60; --quick 8)")
    p.add_argument("--warmup", type=int, default=6, help="steps left out of the medians (fewer than --steps - 2)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per shape")
    p.add_argument("--override", nargs="+", action="append", default=[], help="config overrides (key=value)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bf16_step.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--common", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else 60
    if args.child:
        return child(args)
    patterns = ["top1-e8-1t"] if args.quick else args.shapes
    names = [n for n in SHAPES if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    if not names:
        sys.exit(f"--shapes {args.shapes}: none of {', '.join(SHAPES)}")
    import torch

    from bench.common import env_info, fmt_table, write_json

    common = [*MODEL, "train.precision=bf16", *QUIET_RUN, *(o for group in args.override for o in group)]
    common.append(f"data.cache_dir={prepare_data(common)}")
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bf16_step_") as tmp:
        rows = [run_shape(name, args, common, Path(tmp)) for name in names]
    elapsed = time.perf_counter() - started
    header = ["shape", "DeepSpeed step ms", "grouped step ms", "saved ms", "DeepSpeed / grouped", "train step ms",
              "saved / train step"]  # fmt: skip
    table = [[r["shape"], f"{r['deepspeed_step_ms']:.2f}", f"{r['grouped_step_ms']:.2f}", f"{r['saved_ms']:.2f}",
              f"{r['deepspeed_over_grouped']:.2f}", f"{r['train_step_ms']:.1f}", f"{100 * r['saved_share_of_step']:.1f} %"]
             for r in rows]  # fmt: skip
    print(fmt_table(table, header))
    env = env_info(torch.device("cpu"))
    env["cpu_threads"] = 1
    payload = {
        "benchmark": "bf16_step", "env": env, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "elapsed_s": elapsed, "config": str(CONFIG.relative_to(REPO)), "overrides": common, "steps": args.steps,
        "warmup_steps": args.warmup, "rows": rows,
    }  # fmt: skip
    print(f"wrote {write_json(args.out, payload)} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
