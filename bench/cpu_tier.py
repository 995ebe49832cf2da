"""CPU tier of docs/benchmarks.md: exact counters (C1-C4) and timing ratios, measured in one run.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

    python bench/cpu_tier.py            # full: S1-cpu and S2-cpu, a few minutes on 2 cores
    python bench/cpu_tier.py --quick    # smaller shapes, under a minute

Every layer runs forward + backward in fp32 on the same weights and routing (checked: the dropless
outputs of moetrain, DeepSpeed and the naive loop agree). Ratios > 1 mean moetrain is faster, except
``moetrain/dense`` (the cost of being sparse; 1.0 is the limit) and ``moetrain/experts-only`` (the
cost of routing around the expert GEMMs). ``deepspeed/experts-only`` is the ceiling of the
deepspeed/moetrain ratio: what a layer costing only its expert GEMMs would reach. Writes
bench/results/cpu_tier.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    AtenOpCounter,
    count_flops,
    env_info,
    fmt_table,
    init_single_process_deepspeed,
    interleaved_medians,
    saved_activation_bytes,
    write_json,
)
from bench.layers import (  # noqa: E402
    DenseFFN,
    ExpertsOnly,
    NaiveLoopMoE,
    Shape,
    build_deepspeed,
    build_moetrain,
    forward_fn,
    train_step_fn,
)
from moetrain.training.host_memory import retain_freed_memory  # noqa: E402
from tests.host_sync import HostSyncCounter  # noqa: E402 - a test utility, not in the package

SEED = 0
FULL_SHAPES = [Shape("S1-cpu", 1024, 512, 1024, 8, 2), Shape("S2-cpu", 1024, 256, 512, 128, 8)]
QUICK_SHAPES = [Shape("S1-cpu-quick", 256, 256, 512, 8, 2), Shape("S2-cpu-quick", 512, 128, 256, 128, 8)]
C3_EXPERTS = [8, 16, 32, 64, 128]


def with_k(shape: Shape, k: int) -> Shape:
    return Shape(f"{shape.name}/top{k}", shape.tokens, shape.d_model, shape.d_hidden, shape.num_experts, k)


def make_inputs(shape: Shape, seed: int = SEED):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(shape.tokens, shape.d_model, generator=g).requires_grad_(True)
    token_ids_T = torch.randint(0, 256, (shape.tokens,), generator=g)
    w_TD = torch.randn(shape.tokens, shape.d_model, generator=g)
    return x_TD, token_ids_T, w_TD


def build_all(shape: Shape, with_naive: bool) -> dict[str, tuple[str, torch.nn.Module]]:
    """name -> (kind, module); every MoE shares moetrain's dropless layer's weights. ``experts-only``
    (timing only): moetrain's expert GEMMs alone on its dropless routing, the floor under any layer."""
    mt = build_moetrain(shape, None, seed=SEED)
    mt_cap = build_moetrain(shape, 1.0, seed=SEED)
    mt_cap.load_state_dict(mt.state_dict())
    layers = {
        "moetrain": ("moetrain", mt),
        "deepspeed": ("deepspeed", build_deepspeed(mt, shape, None)),
        "moetrain@cf1": ("moetrain", mt_cap),
        "deepspeed@cf1": ("deepspeed", build_deepspeed(mt, shape, 1.0)),
        "dense": ("dense", DenseFFN(shape)),
    }
    if with_naive:
        layers["naive"] = ("naive", NaiveLoopMoE(mt, shape.top_k))
    return layers


def check_same_outputs(shape: Shape, layers: dict, x_TD, token_ids_T) -> dict[str, float]:
    """Max |y - y_moetrain| of the dropless layers: proves the same weights and routing."""
    with torch.no_grad():
        ref = forward_fn("moetrain", layers["moetrain"][1], x_TD, token_ids_T)()[0]
        diffs = {}
        for name in ("deepspeed", "naive"):
            if name in layers:
                kind, module = layers[name]
                y = forward_fn(kind, module, x_TD, token_ids_T)()[0]
                diffs[name] = float((y - ref).abs().max())
    worst = max(diffs.values())
    if worst > 1e-4:
        raise RuntimeError(f"{shape.name}: layers disagree (max abs diff {worst:.3g}); not the same routing")
    return diffs


def timing(shape: Shape, reps: int, with_naive: bool) -> dict:
    layers = build_all(shape, with_naive)
    x_TD, token_ids_T, w_TD = make_inputs(shape)
    diffs = check_same_outputs(shape, layers, x_TD, token_ids_T)
    for name in ("moetrain", "moetrain@cf1"):
        floor = ExpertsOnly(layers[name][1], x_TD, token_ids_T)
        layers[name.replace("moetrain", "experts-only")] = ("experts-only", floor)
    steps = {name: train_step_fn(kind, m, x_TD, token_ids_T, w_TD) for name, (kind, m) in layers.items()}
    t = interleaved_medians(steps, reps=reps)
    ratios, ratios_cpu = {}, {}
    for key, out in (("median_s", ratios), ("cpu_median_s", ratios_cpu)):
        med = {name: v[key] for name, v in t.items()}
        out["deepspeed/moetrain (dropless)"] = med["deepspeed"] / med["moetrain"]
        out["deepspeed/moetrain (cf 1.0)"] = med["deepspeed@cf1"] / med["moetrain@cf1"]
        out["moetrain/dense"] = med["moetrain"] / med["dense"]
        out["moetrain/experts-only"] = med["moetrain"] / med["experts-only"]
        out["deepspeed/experts-only (dropless): the ceiling"] = med["deepspeed"] / med["experts-only"]
        out["deepspeed/experts-only (cf 1.0): the ceiling"] = med["deepspeed@cf1"] / med["experts-only@cf1"]
        if with_naive:
            out["naive/moetrain"] = med["naive"] / med["moetrain"]
    return {
        "shape": shape.as_dict(),
        "times": t,
        "ratios": ratios,
        "ratios_cpu_time": ratios_cpu,
        "max_abs_diff_vs_moetrain": diffs,
    }


def counters(shape: Shape) -> dict:
    """C1 FLOP inflation, C2 host syncs, C4 saved activations, for each layer (fwd + bwd)."""
    layers = build_all(shape, with_naive=True)
    x_TD, token_ids_T, w_TD = make_inputs(shape)
    ideal = shape.ideal_train_flops()
    dense_ideal = 3 * 2 * 2 * shape.tokens * shape.d_model * shape.top_k * shape.d_hidden
    out: dict[str, dict] = {}
    for name, (kind, module) in layers.items():
        step = train_step_fn(kind, module, x_TD, token_ids_T, w_TD)
        step()  # warm-up (lazy init)
        with HostSyncCounter(host_data=True) as syncs:
            step()
        params = list(module.parameters())
        fwd = forward_fn(kind, module, x_TD, token_ids_T)
        saved = saved_activation_bytes(fwd, params)
        flops = count_flops(step)
        out[name] = {
            "C1_flops_over_ideal": flops / (dense_ideal if kind == "dense" else ideal),
            "C2_host_syncs": sum(e.op != "aten.lift_fresh.default" for e in syncs.events),
            "C2_host_data_tensors": sum(e.op == "aten.lift_fresh.default" for e in syncs.events),
            "C2_sync_sites": sorted({f"{e.op} at {e.where}" for e in syncs.events}),
            "C4_saved_bytes_over_TDb": saved / (shape.tokens * shape.d_model * 4),
        }
    n, b = shape.tokens * shape.top_k, 4
    gather_fused = shape.tokens * shape.d_model + 2 * n * shape.d_hidden + n * shape.d_model
    gather_fused += shape.tokens * shape.num_experts + 2 * n  # fp32 scores, gates + rows
    out["gather-fused reference (analytic)"] = {
        "C4_saved_bytes_over_TDb": gather_fused * b / (shape.tokens * shape.d_model * b)
    }
    return out


def aten_ops_vs_experts(quick: bool) -> dict:
    """C3: aten ops in one forward as E grows (fixed T, D, F, K=2)."""
    result: dict[str, dict[int, int]] = {"moetrain": {}, "deepspeed": {}, "naive": {}}
    for e in C3_EXPERTS[:3] if quick else C3_EXPERTS:
        shape = Shape(f"C3-E{e}", 256, 64, 128, e, 2)
        mt = build_moetrain(shape, None, seed=SEED)
        x_TD, token_ids_T, _ = make_inputs(shape)
        modules = {
            "moetrain": mt,
            "deepspeed": build_deepspeed(mt, shape, None),
            "naive": NaiveLoopMoE(mt, 2),
        }
        for name, module in modules.items():
            fwd = forward_fn(name, module, x_TD, token_ids_T)
            fwd()
            with AtenOpCounter() as ops:
                fwd()
            result[name][e] = ops.total
    return result


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (same reps)")
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions per variant (>= 11)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--retain-host-memory",
        action="store_true",
        help="keep freed memory in the process, as moetrain's CPU training does (moetrain/training/host_memory.py)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_tier.json"))
    args = parser.parse_args()
    if args.retain_host_memory and not retain_freed_memory():
        parser.error("--retain-host-memory needs glibc")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    init_single_process_deepspeed()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES

    record = {"env": env_info(torch.device("cpu")), "seed": SEED, "quick": args.quick, "dtype": "float32"}
    record["retain_host_memory"] = args.retain_host_memory
    record["load_average_before"] = os.getloadavg()
    progress("counters C1, C2, C4")
    record["counters"] = {s.name: counters(s) for s in shapes}
    progress("counter C3")
    record["C3_aten_ops_per_forward_vs_E"] = aten_ops_vs_experts(args.quick)
    record["timing"] = {}
    for s in shapes:
        for k in sorted({1, 2, s.top_k}):
            shape_k = with_k(s, k)
            progress(f"timing {shape_k.name}")
            record["timing"][shape_k.name] = timing(shape_k, args.reps, with_naive=k == s.top_k)
    record["load_average_after"] = os.getloadavg()
    path = write_json(args.out, record)
    print_report(record)
    print(f"\nwrote {path}")


def print_report(record: dict) -> None:
    env = record["env"]
    print(f"device: {env['device']} ({env['cpu_threads']} threads); torch {env['torch']}, "
          f"triton {env['triton']}, deepspeed {env['deepspeed']}")  # fmt: skip
    rows = []
    for shape, layers in record["counters"].items():
        for name, c in layers.items():
            rows.append([shape, name, c.get("C1_flops_over_ideal", "-"), c.get("C2_host_syncs", "-"),
                         c.get("C2_host_data_tensors", "-"),
                         c["C4_saved_bytes_over_TDb"]])  # fmt: skip
    print(
        "\nCounters (fwd+bwd, fp32)\n"
        + fmt_table(rows, ["shape", "layer", "C1 FLOPs/ideal", "C2 syncs", "C2 H2D tensors", "C4 saved/TDb"])
    )
    c3 = record["C3_aten_ops_per_forward_vs_E"]
    experts = list(next(iter(c3.values())))
    rows = [[name, *[by_e[e] for e in experts]] for name, by_e in c3.items()]
    print(
        "\nC3 aten ops per forward (T=256, D=64, F=128, K=2)\n"
        + fmt_table(rows, ["layer", *[f"E={e}" for e in experts]])
    )
    rows = []
    for shape, t in record["timing"].items():
        for ratio, value in t["ratios"].items():
            rows.append([shape, ratio, value, t["ratios_cpu_time"][ratio]])
    header = ["shape", "ratio", "wall-time", "CPU-time"]
    print("\nTiming ratios (fwd+bwd, medians of interleaved reps)\n" + fmt_table(rows, header))


if __name__ == "__main__":
    main()
