"""The CPU combine (out[t] = sum_k gate[t,k] * y[t,k]), forward + backward: ``torch.bmm`` against ``_WeightedSum``.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

    python bench/combine.py --threads 1      # the shapes of bench/e2e_lm.py, cpu_tier.py and torchtitan_layer.py

- **bmm**: ``bmm(gates_T1K, y_TKD)`` through autograd, as ``unpermute_reference`` computed it before;
- **weighted_sum**: ``kernels/permute.py``'s ``_WeightedSum`` (K fused multiply-adds forward; y's gradient one
  broadcast product; the gates' gradient ``bmm`` of [1, D] x [D, K] in fp32, ``vecdot`` otherwise).

``unpermute_reference`` takes bmm in fp32 from K*D = 400 (where torch's CPU bmm runs BLAS) and the
weighted sum otherwise; the table says which ("moetrain uses").

Both take the same gathered rows and gates and a fixed output gradient; the script checks that outputs
and both gradients agree (relative 1e-5 in fp32, 2e-2 in bf16) before timing. Interleaved medians of 51
(bench/common.py). Writes bench/results/combine.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import env_info, fmt_table, interleaved_medians, write_json  # noqa: E402
from moetrain.kernels.permute import _WeightedSum, combine_uses_bmm  # noqa: E402
from moetrain.training.host_memory import retain_freed_memory  # noqa: E402

# (tokens, k, d_model): e2e_lm / llama_tiny top-2, torchtitan S1 top-2, cpu_tier S2 top-2 and top-8, FG top-6
SHAPES = [(1024, 2, 128), (1024, 2, 512), (1024, 2, 256), (1024, 8, 256), (1024, 6, 512)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def closures(tokens: int, k: int, d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(tokens * k + d)
    y_TKD = torch.randn(tokens, k, d, generator=g).to(dtype).requires_grad_()
    gates_TK = torch.rand(tokens, k, generator=g).to(dtype).requires_grad_()
    grad_TD = torch.randn(tokens, d, generator=g).to(dtype)

    def run(fn):
        def step():
            out = fn()
            return (out, *torch.autograd.grad(out, (y_TKD, gates_TK), grad_TD))

        return step

    return {
        "bmm": run(lambda: torch.bmm(gates_TK.unsqueeze(1), y_TKD).squeeze(1)),
        "weighted_sum": run(lambda: _WeightedSum.apply(y_TKD, gates_TK)),
    }


def check(variants: dict, dtype: torch.dtype) -> float:
    """Largest relative difference (output, y's gradient, the gates' gradient)."""
    worst = 0.0
    for a, b in zip(variants["bmm"](), variants["weighted_sum"]()):
        worst = max(worst, float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)))
    if worst > TOLERANCE[dtype]:
        raise RuntimeError(f"the two combines disagree: relative difference {worst:.3g}")
    return worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=51)
    p.add_argument("--retain-host-memory", action="store_true", help="keep freed memory in the process")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "combine.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_host_memory and not retain_freed_memory():
        p.error("--retain-host-memory needs glibc")
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, k, d in SHAPES:
            variants = closures(tokens, k, d, dtype)
            uses = "bmm" if combine_uses_bmm(torch.empty(0, d, dtype=dtype), k) else "weighted_sum"
            diff = check(variants, dtype)
            t = interleaved_medians(variants, reps=args.reps, warmup=5)
            rows.append({
                "tokens": tokens, "k": k, "d_model": d, "dtype": str(dtype).replace("torch.", ""),
                "bmm_ms": t["bmm"]["median_s"] * 1e3, "weighted_sum_ms": t["weighted_sum"]["median_s"] * 1e3,
                "bmm/weighted_sum": t["bmm"]["median_s"] / t["weighted_sum"]["median_s"], "max_rel_diff": diff,
                "moetrain_uses": uses,
            })  # fmt: skip
    env = env_info(torch.device("cpu"))
    write_json(args.out, {
        "benchmark": "combine", "env": env, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "elapsed_s": time.perf_counter() - started, "reps": args.reps,
        "retain_host_memory": args.retain_host_memory, "rows": rows,
    })  # fmt: skip
    print(f"device: {env['device']} ({env['cpu_threads']} threads), torch {env['torch']}")
    print(fmt_table(
        [[f"{r['tokens']}x{r['k']}x{r['d_model']}", r["dtype"], f"{r['bmm_ms']:.3f}", f"{r['weighted_sum_ms']:.3f}",
          f"{r['bmm/weighted_sum']:.2f}", r["moetrain_uses"], f"{r['max_rel_diff']:.1e}"] for r in rows],
        ["T x K x D", "dtype", "bmm ms", "weighted sum ms", "bmm / weighted sum", "moetrain uses", "rel diff"],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
