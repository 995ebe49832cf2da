"""GPU tier of docs/benchmarks.md (G0-G6), for an H100 / H200. Prints ratios measured in one run.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

    python bench/gpu_tier.py                 # S1 + S2 at T=16384, bf16, about 5 minutes
    python bench/gpu_tier.py --only G1 G3    # a subset
    TRITON_INTERPRET=1 python bench/gpu_tier.py --smoke   # CPU plumbing check, tiny shapes, no numbers

G0 measured ceilings (copy bandwidth, dense bf16 matmul); G1 fused gating vs eager; G2 routing
metadata vs sort + bincount + cumsum; G3 permute / unpermute vs index_select / scatter_add_; G4
torch._grouped_mm vs a dense matmul of the same FLOPs; G5 the whole layer vs deepspeed.moe, the naive
loop and the reference path (sort + _grouped_mm); G6 torch.cuda.set_sync_debug_mode("error").
Writes bench/results/gpu_tier.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import env_info, fmt_table, init_single_process_deepspeed, interleaved_medians, write_json  # noqa: E402
from bench.layers import NaiveLoopMoE, Shape, build_deepspeed, build_moetrain, train_step_fn  # noqa: E402
from moetrain.kernels import gating, permute  # noqa: E402
from tests.host_sync import HostSyncCounter  # noqa: E402 - a test utility, not in the package

SEED = 0
SHAPES = [Shape("S1", 16384, 4096, 14336, 8, 2), Shape("S2", 16384, 2048, 768, 128, 8)]
SMOKE_SHAPES = [Shape("S1-smoke", 64, 64, 128, 8, 2), Shape("S2-smoke", 64, 32, 32, 16, 4)]


class Bench:
    def __init__(self, device: torch.device, dtype: torch.dtype, reps: int, smoke: bool) -> None:
        self.device, self.dtype, self.reps, self.smoke = device, dtype, reps, smoke
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time(self, variants: dict, inner: int = 1) -> dict[str, float]:
        """Median seconds per call; ``inner`` calls per sample amortise the host round trip."""
        inner = 1 if self.smoke else inner

        def repeat(fn):
            return lambda: [fn() for _ in range(inner)]

        t = interleaved_medians({k: repeat(f) for k, f in variants.items()}, self.reps, sync=self.sync)
        return {name: v["median_s"] / inner for name, v in t.items()}

    def randn(self, *shape, dtype=None, grad=False) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device, dtype=dtype or self.dtype)
        return t.requires_grad_(grad)


def routing(b: Bench, shape: Shape, kind: str = "uniform") -> torch.Tensor:
    """Expert ids [T, K]: uniform random distinct experts, Zipf-skewed, or all on expert 0 (+ others)."""
    t, e, k = shape.tokens, shape.num_experts, shape.top_k
    if kind == "one":
        return torch.arange(k, device=b.device).expand(t, k).contiguous()
    weights = torch.ones(e) if kind == "uniform" else 1.0 / torch.arange(1, e + 1)
    return torch.multinomial(weights.expand(t, -1), k, replacement=False).to(b.device)


# -------------------------------------------------------------------------------------- G0 .. G4


def g0_ceilings(b: Bench) -> dict:
    n = (1 << 20) if b.smoke else (1 << 29)  # 1 GiB of bf16
    src, dst = b.randn(n), torch.empty(n, device=b.device, dtype=b.dtype)
    m = 256 if b.smoke else 8192
    a, w = b.randn(m, m), b.randn(m, m)
    t = b.time({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ w})
    return {
        "beta_GBps": 2 * n * src.element_size() / t["copy"] / 1e9,
        "pi_TFLOPs": 2 * m**3 / t["matmul"] / 1e12,
    }


def eager_gating(logits_TE, k, score_func, renormalize):
    scores_TE = torch.softmax(logits_TE.float(), -1) if score_func == "softmax" else torch.sigmoid(logits_TE.float())
    gates_TK, ids_TK = torch.topk(scores_TE, k, dim=-1)
    if renormalize:
        gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
    counts_E = torch.zeros(logits_TE.shape[1], dtype=torch.int64, device=logits_TE.device)
    counts_E.scatter_add_(0, ids_TK.reshape(-1), torch.ones_like(ids_TK.reshape(-1)))
    return ids_TK, gates_TK, scores_TE, counts_E


def g1_gating(b: Bench, shape: Shape) -> dict:
    logits_TE = b.randn(shape.tokens, shape.num_experts, dtype=torch.float32, grad=True)
    w_TK = b.randn(shape.tokens, shape.top_k, dtype=torch.float32)
    return {sf: _g1_one(b, logits_TE, w_TK, shape.top_k, sf, sf == "softmax") for sf in ("softmax", "sigmoid")}


def _g1_one(b: Bench, logits_TE, w_TK, k: int, score_func: str, renorm: bool) -> dict:
    def fused():
        g = gating.topk_gating(logits_TE, k, score_func, renorm)
        torch.autograd.grad((g.gates_TK * w_TK).sum() + g.scores_TE.mean(), logits_TE)

    def eager():
        _, gates_TK, scores_TE, _ = eager_gating(logits_TE, k, score_func, renorm)
        torch.autograd.grad((gates_TK * w_TK).sum() + scores_TE.mean(), logits_TE)

    t = b.time({"fused": fused, "eager": eager}, inner=10)
    return {
        "fused_us": t["fused"] * 1e6,
        "eager_us": t["eager"] * 1e6,
        "eager/fused": t["eager"] / t["fused"],
    }


def sort_metadata(ids_TK, num_experts):
    flat_N = ids_TK.reshape(-1)
    order_N = torch.sort(flat_N, stable=True).indices
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    offsets_E = torch.cumsum(counts_E, 0)
    rows_N = torch.empty_like(order_N)
    rows_N[order_N] = torch.arange(flat_N.numel(), device=flat_N.device)
    return rows_N, counts_E, offsets_E


def g2_metadata(b: Bench, shape: Shape) -> dict:
    ids_TK = routing(b, shape)
    with HostSyncCounter() as syncs:
        permute.routing_map(ids_TK, shape.num_experts)
    t = b.time(
        {"kernel": lambda: permute.routing_map(ids_TK, shape.num_experts),
         "sort+bincount+cumsum": lambda: sort_metadata(ids_TK, shape.num_experts)},
        inner=20,
    )  # fmt: skip
    return {"kernel_us": t["kernel"] * 1e6, "baseline_us": t["sort+bincount+cumsum"] * 1e6,
            "baseline/kernel": t["sort+bincount+cumsum"] / t["kernel"], "host_syncs": syncs.count}  # fmt: skip


def g3_permute(b: Bench, shape: Shape, beta_GBps: float) -> dict:
    return {kind: _g3_one(b, shape, kind, beta_GBps) for kind in ("uniform", "zipf", "one")}


def _g3_one(b: Bench, shape: Shape, kind: str, beta_GBps: float) -> dict:
    t_, d, k = shape.tokens, shape.d_model, shape.top_k
    rows_TK, _ = permute.routing_map(routing(b, shape, kind), shape.num_experts)
    x_TD, y_ND = b.randn(t_, d, grad=True), b.randn(t_ * k, d, grad=True)
    gates_TK = torch.rand(t_, k, device=b.device, requires_grad=True)
    g_ND, g_TD = b.randn(t_ * k, d), b.randn(t_, d)
    token_N = torch.arange(t_, device=b.device).repeat_interleave(k)
    flat_rows_N = rows_TK.reshape(-1)
    token_of_row_N = torch.empty_like(flat_rows_N).scatter_(0, flat_rows_N, token_N)

    def baseline_combine():  # the scatter_add_ combine most codebases start from
        weighted_ND = y_ND.detach()[flat_rows_N] * gates_TK.detach().reshape(-1, 1).to(b.dtype)
        return torch.zeros_like(x_TD).scatter_add_(0, token_N[:, None].expand(-1, d), weighted_ND)

    variants = {
        "permute fwd": lambda: permute.permute(x_TD.detach(), rows_TK),
        "index_select fwd": lambda: x_TD.detach().index_select(0, token_of_row_N),
        "unpermute fwd": lambda: permute.unpermute(y_ND.detach(), rows_TK, gates_TK.detach()),
        "scatter_add_ fwd": baseline_combine,
        "permute fwd+bwd": lambda: torch.autograd.backward(permute.permute(x_TD, rows_TK), g_ND),
        "unpermute fwd+bwd": lambda: torch.autograd.backward(permute.unpermute(y_ND, rows_TK, gates_TK), g_TD),
    }
    t = b.time(variants, inner=5)
    moved = (t_ + t_ * k) * d * x_TD.element_size()  # read T*D + write N*D (or the reverse)
    return {
        **{f"{name}_us": v * 1e6 for name, v in t.items()},
        "permute fwd / beta": moved / t["permute fwd"] / 1e9 / beta_GBps,
        "unpermute fwd / beta": moved / t["unpermute fwd"] / 1e9 / beta_GBps,
        "scatter_add_/unpermute": t["scatter_add_ fwd"] / t["unpermute fwd"],
        "index_select/permute": t["index_select fwd"] / t["permute fwd"],
    }


def g4_grouped_gemm(b: Bench, shape: Shape) -> dict:
    n, d, f, e = shape.tokens * shape.top_k, shape.d_model, shape.d_hidden, shape.num_experts
    x_ND, w_EDF, w_DF = b.randn(n, d), b.randn(e, d, f), b.randn(d, f)
    offs_E = torch.arange(1, e + 1, device=b.device, dtype=torch.int32) * (n // e)  # balanced
    if not hasattr(torch, "_grouped_mm") or (b.device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9):
        return {"skipped": "torch._grouped_mm needs sm90+"}
    t = b.time({"grouped": lambda: torch._grouped_mm(x_ND, w_EDF, offs=offs_E), "dense": lambda: x_ND @ w_DF})
    return {
        "grouped_us": t["grouped"] * 1e6,
        "dense_us": t["dense"] * 1e6,
        "dense/grouped": t["dense"] / t["grouped"],
    }


# -------------------------------------------------------------------------------------- G5, G6


def g5_layer(b: Bench, shape: Shape, ceilings: dict) -> dict:
    mt = build_moetrain(shape, None, kernels="auto", seed=SEED).to(b.device, b.dtype)
    ref = build_moetrain(shape, None, kernels="torch", seed=SEED).to(b.device, b.dtype)
    ref.load_state_dict(mt.state_dict())
    layers = {"moetrain": ("moetrain", mt), "sort+_grouped_mm": ("moetrain", ref),
              "deepspeed": ("deepspeed", build_deepspeed(mt, shape, None)),
              "deepspeed@cf1": ("deepspeed", build_deepspeed(mt, shape, 1.0))}  # fmt: skip
    if shape.num_experts <= 32 or b.smoke:  # the loop at E=128 takes minutes per rep
        layers["naive"] = ("naive", NaiveLoopMoE(mt, shape.top_k))
    x_TD, w_TD = b.randn(shape.tokens, shape.d_model, grad=True), b.randn(shape.tokens, shape.d_model)
    token_ids_T = torch.randint(0, 256, (shape.tokens,), device=b.device)
    t = b.time({name: train_step_fn(kind, m, x_TD, token_ids_T, w_TD) for name, (kind, m) in layers.items()})
    b_perm = 2 * (shape.top_k + 1) * shape.tokens * shape.d_model * x_TD.element_size()
    t_ideal = shape.ideal_train_flops() / (ceilings["pi_TFLOPs"] * 1e12) + 2 * b_perm / (ceilings["beta_GBps"] * 1e9)
    out = {f"{name}_ms": v * 1e3 for name, v in t.items()}
    out.update({f"{name}/moetrain": v / t["moetrain"] for name, v in t.items() if name != "moetrain"})
    out["eta"] = t_ideal / t["moetrain"]
    out["backend"] = mt.router.backend.name
    return out


def g6_sync(b: Bench, shape: Shape) -> dict:
    if b.device.type != "cuda":
        return {"skipped": "needs CUDA"}
    mt = build_moetrain(shape, None, kernels="auto", seed=SEED).to(b.device, b.dtype)
    x_TD, w_TD = b.randn(shape.tokens, shape.d_model, grad=True), b.randn(shape.tokens, shape.d_model)
    step = train_step_fn("moetrain", mt, x_TD, torch.zeros(shape.tokens, dtype=torch.long, device=b.device), w_TD)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return {"syncs": 0, "ok": True}
    except RuntimeError as e:
        return {"ok": False, "error": str(e).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run_shape(b: Bench, shape: Shape, only: list[str], ceilings: dict | None) -> dict:
    res: dict = {"shape": shape.as_dict()}
    steps = {
        "G1": lambda: g1_gating(b, shape),
        "G2": lambda: g2_metadata(b, shape),
        "G3": lambda: g3_permute(b, shape, ceilings["beta_GBps"]),
        "G4": lambda: g4_grouped_gemm(b, shape),
        "G5": lambda: g5_layer(b, shape, ceilings),
        "G6": lambda: g6_sync(b, shape),
    }
    for name, fn in steps.items():
        if name in only:
            print(f"{shape.name} {name} ...", file=sys.stderr, flush=True)
            res[name] = fn()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--only", nargs="*", default=["G0", "G1", "G2", "G3", "G4", "G5", "G6"])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_tier.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("the GPU tier needs a CUDA device (use --smoke for a CPU plumbing check)")
    torch.manual_seed(SEED)
    init_single_process_deepspeed()
    b = Bench(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.reps, args.smoke)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    record: dict = {"env": env_info(device), "seed": SEED, "smoke": args.smoke, "dtype": str(b.dtype)}
    record["G0"] = g0_ceilings(b) if "G0" in args.only or "G3" in args.only or "G5" in args.only else None
    for shape in shapes:
        record[shape.name] = run_shape(b, shape, args.only, record["G0"])
    path = write_json(args.out, record)
    print_report(record, shapes)
    print(f"\nwrote {path}")


def flatten(prefix: str, value) -> list[list]:
    if isinstance(value, dict):
        return [row for k, v in value.items() if k != "shape" for row in flatten(f"{prefix}{k}.", v)]
    return [[prefix[:-1], value]]


def print_report(record: dict, shapes: list[Shape]) -> None:
    env = record["env"]
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, deepspeed {env['deepspeed']}")
    if record.get("smoke"):
        print("SMOKE RUN: tiny shapes (on CPU: the Triton interpreter); the numbers mean nothing")
    rows = flatten("G0.", record["G0"]) if record.get("G0") else []
    for shape in shapes:
        rows += flatten(f"{shape.name}.", record[shape.name])
    print(fmt_table(rows, ["metric", "value"]))


if __name__ == "__main__":
    main()
