"""What new expert row counts cost a bf16 MoE layer on the CPU.

bf16 matmuls on the CPU go to oneDNN, which builds one kernel (primitive) per shape and caches it
(``train.cpu_kernel_cache``, docs/benchmarks.md). Dropless routing gives every expert a new row count
almost every step, so most of the experts' GEMMs miss the cache. This times forward + backward of the
grouped experts (fp32 for comparison, bf16) with the same total rows under three kinds of counts:

- **same**: one random draw of per-expert counts, reused every call (every shape cached);
- **new**: a fresh random draw every call (what dropless training does);
- **multiple of M**: a fresh draw rounded down to multiples of ``--multiple`` (the rest on the last
  expert), so only about rows / M shapes exist per GEMM.

The ratio new / same is what new shapes cost; multiple-of-M / same is what padding each expert's rows
to a multiple of M could win back, before the cost of the padded rows themselves (not built).

    python bench/cpu_bf16_shapes.py                 # 1 thread, E=8, D=128, F=512, 1024 rows, cache 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import env_info, fmt_table, interleaved_medians, write_json  # noqa: E402
from moetrain.moe.experts import GroupedExperts  # noqa: E402
from moetrain.training.host_memory import bound_kernel_caches  # noqa: E402


def _step(experts: GroupedExperts, x: torch.Tensor, counts_fn):
    """Forward + backward of ``experts`` on ``x`` with the counts ``counts_fn`` draws."""

    def run():
        xx = x.detach().requires_grad_()
        experts(xx, counts_fn()).float().sum().backward()
        experts.zero_grad(set_to_none=True)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--multiple", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--kernel-cache", type=int, default=256, help="train.cpu_kernel_cache (0: the libraries' default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_bf16_shapes.json"))
    args = p.parse_args()
    if args.kernel_cache:  # as the trainer sets it, before the first bf16 matmul
        bound_kernel_caches(args.kernel_cache)
    torch.set_num_threads(args.threads)
    E, N, M = args.experts, args.rows, args.multiple
    g = torch.Generator().manual_seed(0)

    def draw() -> torch.Tensor:
        return torch.multinomial(torch.ones(E), N, replacement=True, generator=g).bincount(minlength=E)

    def rounded() -> torch.Tensor:
        c = (draw() // M) * M
        c[-1] += N - c.sum()
        return c

    fixed = draw()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        experts = GroupedExperts("gelu", E, args.d_model, args.hidden).to(dtype)
        torch.nn.init.normal_(experts.w2_SLFD, std=0.02)
        x = torch.randn(N, args.d_model, dtype=dtype)

        kinds = {
            name: _step(experts, x, counts_fn)
            for name, counts_fn in (("same", lambda: fixed), ("new", draw), (f"multiple of {M}", rounded))
        }
        results[str(dtype).removeprefix("torch.")] = interleaved_medians(kinds, reps=args.reps, warmup=5)
    rows = []
    for dtype, res in results.items():
        same = res["same"]["median_s"]
        for kind, r in res.items():
            rows.append([dtype, kind, 1e3 * r["median_s"], r["median_s"] / same])
    print(fmt_table(rows, ["dtype", "counts", "fwd + bwd ms (median)", "/ same"]))
    record = {"env": env_info(torch.device("cpu")), "args": vars(args), "results": results}
    record["env"]["command"] = "python bench/cpu_bf16_shapes.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
