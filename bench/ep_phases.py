"""Expert-parallel overhead: the time of each MoE-layer phase under EP, and EP vs data parallelism.

For P gloo ranks (one intra-op thread each) and one MoE layer (GELU experts, top-k softmax router):

- **EP-P**: the experts sharded over the P ranks (``moetrain.parallel.parallelize``'s all-to-all
  dispatcher). Forward phases are timed by an observer attached to the dispatcher
  (:class:`PhaseTimes`, ``AllToAllDispatcher.observer``):
  routing map, count exchange + host sync (asynchronous, overlapped with the permute), permute, token
  all-to-all, regroup, grouped GEMM (the experts), return all-to-all, combine; then backward as a
  whole. The gradients of the replicated router are all-reduced (the expert gradients need no
  reduction: each expert lives on one rank).
- **EP-P overlapped** (``moe.ep_overlap``): the same, with the exchanges beside the experts' work on
  each rank's own rows (``moetrain/parallel/overlap.py``); the dispatcher times the overlapped part
  as one phase.
- **DP-P**: every rank holds every expert (the local dispatcher); forward + backward, then an
  all-reduce of all gradients (router and experts), as data parallelism must.
- **Overlap probe** (:func:`_overlap_probe`): the token exchange and the experts' forward one after
  the other against the exchange asynchronous beside the experts, on this backend: what splitting the
  exchange per chunk (``moe.ep_overlap``, the "EP-P overlapped" column) builds on.

Both see the same tokens per rank; the ratio DP time / EP time is EP's relative throughput (> 1: EP
is faster). Medians of interleaved repetitions (EP, DP, EP, DP, ...) after two warm-ups.

    python bench/ep_phases.py                       # 2 and 4 ranks, top-1 and top-2
    python bench/ep_phases.py --ranks 2 --quick     # a small shape, seconds

NOTE: on a 2-core machine 4 ranks time-share the cores, so the 4-rank numbers measure contention as
much as the layer; the JSON records the core count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import env_info, fmt_table, write_json  # noqa: E402
from bench.layers import Shape, build_moetrain  # noqa: E402
from moetrain.parallel.layout import ParallelLayout, free_port  # noqa: E402
from moetrain.parallel.parallelize import parallelize  # noqa: E402

PHASES = [
    "router",
    "dispatch, all",
    "routing map",
    "count exchange + host sync",
    "permute",
    "token all-to-all",
    "regroup",
    "grouped GEMM",
    "experts + exchanges, overlapped",
    "combine, all",
    "return all-to-all",
    "combine",
    "backward",
    "gradient all-reduce",
]


@dataclass
class PhaseTimes:
    """Seconds spent in each named phase, summed over calls: the dispatcher's observer
    (``moetrain.parallel.all_to_all.DispatchObserver``) and this script's own timer.

    CPU wall time; on CUDA each phase is bracketed by a device synchronize, which serialises the
    overlap it measures, so use it to find the expensive phase, not for end-to-end time."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0

    @contextmanager
    def __call__(self, name: str, device: torch.device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def phase(self, name: str, device: torch.device):
        return self(name, device)

    def exchanged(self, nbytes: int) -> None:
        self.bytes_sent += nbytes


def _step(layer, x_TD, ids_T, w_TD, timer: PhaseTimes, reduce_params: list[torch.nn.Parameter]) -> None:
    """One forward + backward of ``layer`` as the MoE layer runs it, each part timed."""
    dev = x_TD.device
    layer.zero_grad(set_to_none=True)
    with timer("router", dev):
        decision = layer.router(x_TD, ids_T)
    if getattr(layer.dispatcher, "overlap", False):  # one call: the dispatcher times its phases
        y_TD, _ = layer.dispatcher.run(x_TD, decision, layer.experts)
    else:
        y_TD = _in_sequence(layer, x_TD, decision, timer)
    with timer("backward", dev):
        ((y_TD * w_TD).sum() + decision.aux_loss).backward()
    with timer("gradient all-reduce", dev):
        for p in reduce_params:
            dist.all_reduce(p.grad)


def _in_sequence(layer, x_TD, decision, timer: PhaseTimes):
    """dispatch, experts, combine, as ``run_in_sequence`` calls them, each timed."""
    dev = x_TD.device
    with timer("dispatch, all", dev):  # under EP its phases time themselves too
        x_ND, counts_L, meta = layer.dispatcher.dispatch(x_TD, decision)
    with timer("grouped GEMM", dev):  # as MoELayer.forward calls it
        recompute_x = layer.dispatcher.recompute(x_TD, meta)
        y_ND = layer.experts(x_ND, counts_L, padded=layer.dispatcher.padded(meta), recompute_x=recompute_x)
    with timer("combine, all", dev):
        return layer.dispatcher.combine(y_ND, meta)


def _overlap_probe(experts, shape: Shape, world: int, reps: int) -> dict[str, float]:
    """How much of a token all-to-all a computation can hide on this backend: the seconds (medians) of
    the exchange alone (T*k rows of D, equal splits: the dispatch's bytes under balanced routing), the
    local experts' forward alone on as many rows, one after the other, and overlapped (the exchange
    started asynchronously before the experts, waited for after). ``sequential - overlapped`` is what
    the overlapped form saved; it is not bounded by the exchange's own time, since the sequential form
    may cost more than its two parts timed apart (docs/benchmarks.md)."""
    g = torch.Generator().manual_seed(7)
    rows = shape.tokens * shape.top_k
    send_ND = torch.randn(rows, shape.d_model, generator=g)
    recv_ND = torch.empty_like(send_ND)
    counts_L = torch.full((experts.num_local,), rows // experts.num_local)
    counts_L[0] += rows - int(counts_L.sum())

    def exchange(async_op: bool = False):
        return dist.all_to_all_single(recv_ND, send_ND, async_op=async_op)

    def compute():
        with torch.no_grad():
            experts(send_ND, counts_L)

    def sequential():
        exchange()
        compute()

    def overlapped():
        work = exchange(async_op=True)
        compute()
        work.wait()

    cases = {"exchange": exchange, "experts": compute, "sequential": sequential, "overlapped": overlapped}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(reps + 2):
        for name, fn in cases.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _worker(rank: int, world: int, port: int, shape: Shape, reps: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layout = ParallelLayout(rank=rank, world_size=world, ep_size=world, ep_group=dist.group.WORLD)
        ep = parallelize(build_moetrain(shape, None, seed=0), layout)
        ep.dispatcher.overlap = False
        ep_overlap = parallelize(build_moetrain(shape, None, seed=0), layout)
        ep_overlap.dispatcher.overlap = True
        dp = build_moetrain(shape, None, seed=0)
        dp.router.stats_group = dist.group.WORLD
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
        x_TD = torch.randn(shape.tokens, shape.d_model, generator=g)
        ids_T = torch.randint(0, 256, (shape.tokens,), generator=g)
        w_TD = torch.randn(shape.tokens, shape.d_model, generator=g)
        runs = {
            "EP": (ep, [ep.router.weight_ED]),
            "EP overlapped": (ep_overlap, [ep_overlap.router.weight_ED]),
            "DP": (dp, list(dp.parameters())),
        }
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for i in range(reps + 2):
            for name, (layer, reduce_params) in runs.items():
                timer = PhaseTimes()
                if name.startswith("EP"):
                    layer.dispatcher.observer = timer
                dist.barrier()
                t0 = time.perf_counter()
                _step(layer, x_TD, ids_T, w_TD, timer, reduce_params)
                dist.barrier()
                timer.seconds["total"] = time.perf_counter() - t0
                if i >= 2:
                    samples[name].append(timer.seconds)
        overlap = _overlap_probe(ep.experts, shape, world, reps)
        if rank == 0:
            med = {
                name: {k: statistics.median(s.get(k, 0.0) for s in runs_) for k in [*PHASES, "total"]}
                for name, runs_ in samples.items()
            }
            med["overlap"] = overlap
            torch.save(med, out_path)
    finally:
        dist.destroy_process_group()


def run(world: int, shape: Shape, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "phases.pt")
        mp.start_processes(_worker, args=(world, free_port(), shape, reps, out), nprocs=world, start_method="spawn")
        med = torch.load(out)
    ep, epo, dp = med["EP"], med["EP overlapped"], med["DP"]
    return {
        "world": world,
        "shape": shape.as_dict(),
        "EP_phases_ms": {k: 1e3 * v for k, v in ep.items()},
        "EP_overlapped_phases_ms": {k: 1e3 * v for k, v in epo.items()},
        "DP_phases_ms": {k: 1e3 * v for k, v in dp.items()},
        "DP_time_over_EP_time": dp["total"] / ep["total"],
        "DP_time_over_EP_overlapped_time": dp["total"] / epo["total"],
        "EP_time_over_EP_overlapped_time": ep["total"] / epo["total"],
        "overlap_probe_ms": {k: 1e3 * v for k, v in med["overlap"].items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--quick", action="store_true", help="a small shape")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ep_phases.json"))
    args = p.parse_args()
    # tokens per rank, d_model, expert hidden, experts (divisible by every rank count)
    tokens, d, f, e = (256, 64, 128, 8) if args.quick else (2048, 256, 512, 8)
    record = {"env": env_info(torch.device("cpu")), "cores": os.cpu_count(), "load_average_before": os.getloadavg()}
    record["env"]["command"] = "python bench/ep_phases.py " + " ".join(sys.argv[1:])
    results = []
    for world in args.ranks:
        for k in args.top_k:
            shape = Shape(f"T{tokens}-D{d}-F{f}-E{e}-top{k}", tokens, d, f, e, k)
            print(f"[{time.strftime('%H:%M:%S')}] {world} ranks, {shape.name}", file=sys.stderr, flush=True)
            results.append(run(world, shape, args.reps))
    record["results"] = results
    record["load_average_after"] = os.getloadavg()
    path = write_json(args.out, record)
    rows = []
    for r in results:
        ep, epo, dp = r["EP_phases_ms"], r["EP_overlapped_phases_ms"], r["DP_phases_ms"]
        setup = f"{r['world']} ranks {r['shape']['name']}"
        for phase in [*PHASES, "total"]:
            rows.append([setup, phase, ep[phase], epo[phase], dp[phase]])
        rows.append([setup, "DP time / this time", r["DP_time_over_EP_time"], r["DP_time_over_EP_overlapped_time"], ""])
        rows.append([setup, "EP time / EP overlapped time", "", r["EP_time_over_EP_overlapped_time"], ""])
    print(fmt_table(rows, ["setup", "phase", "EP ms", "EP overlapped ms", "DP ms"]))
    rows = []
    for r in results:
        o = r["overlap_probe_ms"]
        rows.append([f"{r['world']} ranks {r['shape']['name']}", o["exchange"], o["experts"],
                     o["exchange"] + o["experts"], o["sequential"], o["overlapped"],
                     o["sequential"] - o["overlapped"]])  # fmt: skip
    print("\nOverlap probe: a token exchange started asynchronously before the experts' forward (ms, medians)")
    print(fmt_table(rows, ["setup", "exchange", "experts", "exchange + experts", "sequential", "overlapped", "saved"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
