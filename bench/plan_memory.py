"""The memory planner (``moetrain plan``) against training steps measured on this machine.

For each configuration, real ``moetrain`` training processes (the trainer, its DeepSpeed engine, gloo
for EP) run 3 optimizer steps under the PyTorch profiler with ``profile_memory=True``, which sees every
allocation and free of the CPU allocator. Per rank, during the last step:

- **parameters, gradients, optimizer state**: counted exactly, as the bytes of the distinct tensor
  storages the engine holds: the model's parameters (ZeRO's flat bit16 groups), the gradients at the
  end of backward (``.grad`` and ZeRO's partition buffers), the fp32 master weights and Adam's state;
- **activations**: the bytes the allocator holds at the end of the forward minus at its start (what
  the micro-batch keeps for backward), and the most backward adds on top (its working set);
- **total**: what torch holds when the step starts, counted as the bytes of the distinct CPU tensor
  storages any Python object reaches (at a step's start no autograd graph holds a tensor), plus the
  most the allocator's live bytes rise above their value at the step's start during the step.

  NOTE: not the profiler's running sum from process start: under EP that sum drifted from run to run on
  the same code (at the last step's start 3.5-5.2 MB on one rank in three runs, while the storages
  reachable from Python were 2,245,504 bytes in each), so it counts bytes no object holds (a guess at
  why: frees on gloo's or another thread the profiler does not record).

The planner is run with the layout of each configuration, ``device=cpu`` (the CPU grouped GEMM keeps
no input; DeepSpeed's CPU bf16 optimizer), no fixed overhead, and the routing imbalance the step
actually had (the busiest rank's expert rows over the mean), so the comparison tests the formula, not
the imbalance assumption. Errors are (planned - measured) / measured. The busiest rank is reported.

    python bench/plan_memory.py                 # every configuration (~6 min on 2 idle cores)
    python bench/plan_memory.py --only e8-ep2-zero2-moe

On a machine with CUDA GPUs the same script trains on them (one per rank; configurations with more
ranks than GPUs are skipped), plans with ``device=cuda``, and compares the total with
``torch.cuda.max_memory_allocated`` over the last step (activations from ``torch.cuda.memory_allocated``
at the forward's start and end; the working set from the peak during backward). This path has not
run yet: no GPU was available when it was written. Writes bench/results/plan_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.common import env_info, fmt_table, write_json  # noqa: E402
from moetrain.parallel.layout import free_port  # noqa: E402

STEPS = 3
BASE = [  # configs/tiny.yaml made an MoE LM with top-k routing; sizes per configuration below
    "model.max_seq_len=256",
    "data.max_tokens=300000",
    "train.eval_batches=1",
    "logging.interval=1",
    "optim.warmup_steps=1",
    "checkpoint.save_at_end=false",
    "checkpoint.resume=none",
    "moe.router.kind=topk",
    "moe.placement=replace_ffn",
    "moe.fluctuation.interval=0",
    # DeepSpeed's default reduction bucket is 5e8 elements (2 GB fp32): it would dwarf these models
    "deepspeed.zero_optimization.reduce_bucket_size=200000",
]
# name: (world, ep, overrides)
CONFIGS: dict[str, tuple[int, int, list[str]]] = {
    "e8-k2-d128-s128-none-zero0": (
        1, 1,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=gelu",
         "moe.expert_hidden=256", "data.seq_len=128", "train.micro_batch_size=8"],
    ),
    "e16-k4-d64-s256-llama-moe-zero1": (
        1, 1,
        ["model.arch=llama", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2",
         "moe.num_experts=16", "moe.router.top_k=4", "moe.expert_hidden=128", "data.seq_len=256",
         "train.micro_batch_size=4", "train.activation_checkpointing=moe", "deepspeed.zero_optimization.stage=1",
         "train.zero_on_one_process=true"],  # ZeRO-1's own machinery: one process runs stage 0 by default
    ),
    "e8-k2-d128-ep2-zero2-ga2": (
        2, 2,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=swiglu",
         "moe.expert_hidden=256", "data.seq_len=128", "train.micro_batch_size=4", "train.grad_accum_steps=2",
         "deepspeed.zero_optimization.stage=2"],
    ),
    "e8-k1-d96-ep2-block-bf16-zero2": (
        2, 2,
        ["model.d_model=96", "model.n_heads=4", "model.n_layers=4", "moe.every=2", "moe.num_experts=8",
         "moe.router.top_k=1", "moe.expert_type=gelu", "moe.expert_hidden=384", "data.seq_len=128",
         "train.micro_batch_size=8", "train.activation_checkpointing=block", "train.precision=bf16",
         "deepspeed.zero_optimization.stage=2"],
    ),
    "e16-k2-d128-ep4-zero1-shared": (
        4, 4,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=16", "moe.router.top_k=2", "moe.expert_type=gelu",
         "moe.expert_hidden=128", "moe.shared_experts=1", "data.seq_len=64", "train.micro_batch_size=8",
         "deepspeed.zero_optimization.stage=1"],
    ),
    "e32-k8-d64-ep4-world4-zero0": (
        4, 4,
        ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "moe.num_experts=32", "moe.router.top_k=8",
         "moe.expert_type=gelu", "moe.expert_hidden=64", "data.seq_len=64", "train.micro_batch_size=8"],
    ),
    "e8-k2-d128-ep2-world4-zero2-offload": (
        4, 2,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=gelu",
         "moe.expert_hidden=256", "data.seq_len=128", "train.micro_batch_size=4", "deepspeed.zero_optimization.stage=2",
         "deepspeed.zero_optimization.offload_optimizer.device=cpu"],
    ),
    # few tokens, large experts: the optimizer step (moment C) is the peak, not backward
    "e8-k2-d128-s32-ep2-zero2-bf16-step": (
        2, 2,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=swiglu",
         "moe.expert_hidden=1024", "data.seq_len=32", "train.micro_batch_size=1", "train.precision=bf16",
         "deepspeed.zero_optimization.stage=2"],
    ),
    "e8-k2-d128-s32-ep2-zero1-step": (
        2, 2,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=swiglu",
         "moe.expert_hidden=1024", "data.seq_len=32", "train.micro_batch_size=1",
         "deepspeed.zero_optimization.stage=1"],
    ),
    # expert-DP 2: each rank's partition of the experts is one whole stacked weight, whose float64 copy
    # for the norm is the step's peak
    "e8-k2-d128-s32-ep2-world4-zero1-norm": (
        4, 2,
        ["model.d_model=128", "model.n_layers=2", "moe.every=2", "moe.num_experts=8", "moe.router.top_k=2",
         "moe.expert_type=gelu", "moe.expert_hidden=2048", "data.seq_len=32", "train.micro_batch_size=1",
         "deepspeed.zero_optimization.stage=1"],
    ),
    "e8-k2-d128-s32-ep2-zero0-bf16-step": (
        2, 2,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=swiglu",
         "moe.expert_hidden=1024", "data.seq_len=32", "train.micro_batch_size=1", "train.precision=bf16"],
    ),
    "e8-k2-d128-s32-zero0-bf16-step": (
        1, 1,
        ["model.d_model=128", "model.n_layers=2", "moe.num_experts=8", "moe.router.top_k=2", "moe.expert_type=swiglu",
         "moe.expert_hidden=1024", "data.seq_len=32", "train.micro_batch_size=1", "train.precision=bf16"],
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------- measurement


class Timeline:
    """Live allocator bytes over time, from the profiler's memory events (CPU), or CUDA's counters."""

    def __init__(self, events) -> None:
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self.t = np.array([t for t, _ in mem], dtype=np.int64)
        self.live = np.cumsum([n for _, n in mem]) if mem else np.zeros(0)
        self.marks: dict[str, list[tuple[int, int]]] = {}
        for e in events:
            if e.name().startswith("@"):
                self.marks.setdefault(e.name(), []).append((e.start_ns(), e.end_ns()))
        for v in self.marks.values():
            v.sort()

    def at(self, t: int) -> int:
        i = int(np.searchsorted(self.t, t))
        return int(self.live[i - 1]) if i else 0

    def peak(self, a: int, b: int) -> int:
        i, j = int(np.searchsorted(self.t, a)), int(np.searchsorted(self.t, b, side="right"))
        return max(int(self.live[i:j].max()) if j > i else 0, self.at(a))


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr():
                out[s.data_ptr()] = s.nbytes()
    return out


def _flat(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)


def census(engine, model) -> dict[str, int]:
    """Exact bytes of parameters, gradients and optimizer state the engine holds now (device only)."""
    opt = engine.optimizer
    inner = opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer
    params = _storages(model.parameters())
    grads = _storages([p.grad for p in model.parameters()])
    for attr in ("averaged_gradients", "grads_in_partition", "fp32_groups_gradients_flat"):
        grads.update(_storages(_flat(getattr(opt, attr, None))))
    grads.update(_storages([p.grad for p in _flat(getattr(opt, "single_partition_of_fp32_groups", []))]))
    masters = {}
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_groups"):
        masters.update(_storages(_flat(getattr(opt, attr, None))))
    masters.update(_storages(p for g in inner.param_groups for p in g["params"]))
    state = _storages(_flat(list(inner.state.values())))
    optimizer = {k: v for k, v in {**masters, **state}.items() if k not in params}
    return {
        "parameters": sum(params.values()),
        "gradients": sum(v for k, v in grads.items() if k not in params and k not in optimizer),
        "optimizer": sum(optimizer.values()),
    }


@dataclass
class RankResult:
    rank: int
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations_kept: int = 0
    working_set: int = 0
    total_peak: int = 0
    at_step_start: int = 0  # storages reachable from Python when the last step starts (exact)
    rows_factor: float = 1.0
    layer_rows_factors: list[float] = field(default_factory=list)
    host_optimizer: int = 0
    notes: list[str] = field(default_factory=list)


class CudaMarks:
    """On a GPU: torch.cuda's allocator counters at each mark, and the peak since the previous mark."""

    def __init__(self) -> None:
        self.values: dict[str, list[tuple[int, int]]] = {}  # mark -> [(allocated now, peak since last mark)]
        self.order: list[tuple[str, int]] = []  # (mark, peak since the previous mark), in time order

    def __call__(self, name: str) -> None:
        torch.cuda.synchronize()
        now, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        self.values.setdefault(name, []).append((now, peak))
        self.order.append((name, peak))
        torch.cuda.reset_peak_memory_stats()

    def last_step_peak(self) -> int:
        start = max(i for i, (name, _) in enumerate(self.order) if name == "step start")
        return max(peak for _, peak in self.order[start + 1 :])


def _instrument(trainer, rows: list[int], marks: list, cuda: CudaMarks | None) -> None:
    """Mark forwards, backwards and steps for the timeline; census at the accumulation boundary."""
    from torch.profiler import record_function

    engine = trainer.engine
    results: dict[str, dict] = {}
    trainer._plan_census = results

    def pre(module, args):
        marks.append(record_function("@fwd").__enter__())
        if cuda is not None:
            cuda("fwd start")

    def post(module, args, out):
        marks.pop().__exit__(None, None, None)
        if cuda is not None:
            cuda("fwd end")

    engine.register_forward_pre_hook(pre)
    engine.register_forward_hook(post)
    backward, step = engine.backward, engine.step

    def wrapped_backward(loss, *a, **k):
        with record_function("@bwd"):
            out = backward(loss, *a, **k)
        if cuda is not None:
            cuda("bwd end")
        return out

    def wrapped_step(*a, **k):
        if engine.is_gradient_accumulation_boundary():
            results["end_of_backward"] = census(engine, trainer.model)
        with record_function("@step"):
            return step(*a, **k)

    engine.backward, engine.step = wrapped_backward, wrapped_step

    def count_rows(module, args) -> None:
        if module.training:  # the training forwards only (the evaluation at the end routes too)
            rows.append(args[0].shape[0])

    for layer in trainer.model.moe_layers():
        layer.experts.register_forward_pre_hook(count_rows)


def held_storage_bytes() -> int:
    """The bytes of the distinct CPU storages reachable from Python objects: every gc-tracked tensor's, and
    every bare ``UntypedStorage`` a container holds (the CPU experts' kept gradient buffers,
    ``moe/grouped_cpu.py``)."""
    import gc

    seen: dict[int, int] = {}

    def add(storage: torch.UntypedStorage) -> None:
        if storage.device.type == "cpu":
            seen[storage.data_ptr()] = storage.nbytes()

    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            add(obj.untyped_storage())
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                if isinstance(item, torch.UntypedStorage):
                    add(item)
    seen.pop(0, None)  # empty storages
    return sum(seen.values())


class _StepMarks:
    """Trainer callback: one profiler range per optimizer step."""

    def __init__(self, cuda: CudaMarks | None = None) -> None:
        self.open = None
        self.held_at_start = 0
        self.cuda = cuda

    def on_train_start(self, trainer) -> None: ...

    def on_step_start(self, trainer, step: int) -> None:
        import gc

        from torch.profiler import record_function

        # NOTE: under the profiler some of a step's tensors end up in reference cycles (none do in plain
        # training: tested with gc.DEBUG_SAVEALL), which Python frees only at its next cyclic collection.
        gc.collect()
        self.held_at_start = held_storage_bytes()

        self.open = record_function(f"@train_step{step}")
        self.open.__enter__()
        if self.cuda is not None:
            self.cuda("step start")

    def on_step_end(self, trainer, result) -> None:
        self.open.__exit__(None, None, None)
        if self.cuda is not None:
            self.cuda("step end")

    def on_train_end(self, trainer) -> None: ...


def measure_rank(rank: int, world: int, ep: int, overrides: list[str], port: int, workdir: str, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        queue.put(_measure(rank, world, ep, overrides, workdir))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, traceback.format_exc()))


def _measure(rank: int, world: int, ep: int, overrides: list[str], workdir: str) -> RankResult:
    from torch.profiler import ProfilerActivity, profile

    from moetrain.config import load_config
    from moetrain.parallel.layout import ParallelLayout
    from moetrain.training.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*BASE, f"data.cache_dir={workdir}/cache", f"run_dir={workdir}/run{rank}", f"train.steps={STEPS}",
         f"moe.expert_parallel_size={ep}", *overrides],
    )  # fmt: skip
    marks: list = []
    rows: list[int] = []
    cuda = CudaMarks() if torch.cuda.is_available() else None
    steps = _StepMarks(cuda)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=cuda is None) as prof:
        layout = ParallelLayout.init(ep)
        trainer = Trainer(cfg, layout, extra_callbacks=[steps])
        trainer.setup()
        _instrument(trainer, rows, marks, cuda)
        trainer.train()
    exact = trainer._plan_census["end_of_backward"]
    T = cfg.train.micro_batch_size * cfg.data.seq_len
    k = getattr(cfg.moe.router, "top_k", 1)
    last = rows[-len(trainer.model.moe_layers()) :]
    result = RankResult(
        rank=rank,
        parameters=exact["parameters"],
        gradients=exact["gradients"],
        optimizer=exact["optimizer"],
        rows_factor=max(last) / (T * k),
        layer_rows_factors=[r / (T * k) for r in last],
    )
    if cuda is not None:  # the last step's marks: step start, fwd start/end, bwd end (per micro-batch), step end
        v = cuda.values
        result.activations_kept = v["fwd end"][-1][0] - v["fwd start"][-1][0]
        result.working_set = v["bwd end"][-1][1] - v["fwd end"][-1][0]
        result.total_peak = cuda.last_step_peak()
        return result
    line = Timeline(prof.profiler.kineto_results.events())
    s0, s1 = line.marks[f"@train_step{STEPS - 1}"][0]
    f0, f1 = [m for m in line.marks["@fwd"] if s0 <= m[0] <= s1][-1]
    b0, b1 = [m for m in line.marks["@bwd"] if s0 <= m[0] <= s1][-1]
    result.activations_kept = line.at(f1) - line.at(f0)
    result.working_set = line.peak(b0, b1) - line.at(f1)
    result.at_step_start = steps.held_at_start
    result.total_peak = steps.held_at_start + line.peak(s0, s1) - line.at(s0)
    return result


def measure(world: int, ep: int, overrides: list[str]) -> list[RankResult]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        procs = [
            ctx.Process(target=measure_rank, args=(r, world, ep, overrides, port, workdir, queue)) for r in range(world)
        ]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
    for r in results:
        if isinstance(r, tuple):
            raise RuntimeError(f"rank {r[0]} failed:\n{r[1]}")
    return sorted(results, key=lambda r: r.rank)


# --------------------------------------------------------------------------------------- planning


def plan_for(world: int, ep: int, overrides: list[str], rows: list[float], rank: int, device: str = "cpu"):
    from moetrain.config import load_config
    from moetrain.planning.estimate import Assumptions, Layout, estimate
    from moetrain.planning.model_size import model_size
    from moetrain.planning.states import ZeroSettings

    cfg = load_config(REPO / "configs" / "tiny.yaml", [*BASE, "model.vocab_size=257", *overrides])
    zero = ZeroSettings.from_block(cfg.deepspeed)
    layout = Layout(
        world=world,
        procs_per_node=world,
        ep=ep,
        zero=zero.stage,
        recompute=cfg.train.activation_checkpointing,
        offload=zero.offload_optimizer,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum_steps,
    )
    size = model_size(cfg.model, cfg.moe)
    assume = Assumptions(imbalance=max(rows), device=device, overhead=0, layer_rows_factors=tuple(rows), rank=rank)
    return estimate(cfg, size, layout, assume)


MEASURED = ("total_peak", "activations_kept", "working_set", "at_step_start")


def measure_repeated(world: int, ep: int, overrides: list[str], repeats: int) -> tuple[list[RankResult], dict]:
    """Each rank's result over ``repeats`` runs, the least of each measured term (states are exact, and
    equal in every run). NOTE, why the least: on the CPU the profiler's running sum only ever read
    *more* than the step held in our runs (at a step's start it read 3.5-5.2 MB on a rank whose
    reachable storages were 2,245,504 bytes in each of three runs; the activations kept by one EP
    configuration read -0.6 %, -18 % and -39 % against the same plan in three runs), so the least of
    several runs is the closest. The spread is reported beside it."""
    runs = [sorted(measure(world, ep, overrides), key=lambda r: r.rank) for _ in range(repeats)]
    spread = {k: [max(getattr(r[i], k) for r in runs) - min(getattr(r[i], k) for r in runs) for i in range(world)]
              for k in MEASURED}  # fmt: skip
    best = []
    for i in range(world):
        res = runs[0][i]
        for k in MEASURED:
            setattr(res, k, min(getattr(r[i], k) for r in runs))
        best.append(res)
    return best, spread


def compare(name: str, world: int, ep: int, overrides: list[str], repeats: int = 1) -> dict:
    ranks, spread = measure_repeated(world, ep, overrides, repeats)
    busiest = max(ranks, key=lambda r: r.total_peak)  # the rank that would run out of memory first
    device = "cuda" if torch.cuda.is_available() else "cpu"
    est = plan_for(world, ep, overrides, busiest.layer_rows_factors, busiest.rank, device)
    # NOTE: on the CPU, offloaded state ("host memory") lives in the same allocator as the rest
    host = est.states if device == "cpu" else None
    planned = {
        "parameters": est.states.parameters,
        "gradients": est.states.gradients + (host.host_gradients if host else 0),
        "optimizer": est.states.optimizer + (host.host_optimizer if host else 0),
        "activations_kept": est.activations_kept,
        "working_set": est.working_set,
        "total_peak": est.total + (host.host if host else 0),
    }
    measured = {k: getattr(busiest, k) for k in planned}
    return {
        "name": name,
        "world": world,
        "ep": ep,
        "overrides": overrides,
        "rank": busiest.rank,
        "rows_factor": busiest.rows_factor,
        "peak_moment": est.peak_moment,
        "planned": planned,
        "measured": measured,
        "per_rank": [vars(r) for r in ranks],
        "repeats": repeats,
        "spread_over_repeats": {k: v[busiest.rank] for k, v in spread.items()},
        "error": {k: planned[k] / measured[k] - 1 if measured[k] else 0.0 for k in planned},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help="configuration names")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "plan_memory.json"))
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the least of each term")
    args = p.parse_args()
    rows, out = [], []
    gpus = torch.cuda.device_count()
    for name, (world, ep, overrides) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        if gpus and world > gpus:
            print(f"skipping {name}: {world} ranks, {gpus} GPU(s)", flush=True)
            continue
        res = compare(name, world, ep, overrides, args.repeats)
        out.append(res)
        e, m = res["error"], res["measured"]
        rows.append(
            [name, f"{m['total_peak'] / 2**20:.2f}", f"{res['planned']['total_peak'] / 2**20:.2f}",
             f"{e['total_peak']:+.1%}", f"{e['parameters']:+.1%}", f"{e['gradients']:+.1%}",
             f"{e['optimizer']:+.1%}", f"{e['activations_kept']:+.1%}", f"{e['working_set']:+.1%}",
             f"{res['rows_factor']:.2f}", f"{res['spread_over_repeats']['total_peak'] / 2**20:.2f}"]
        )  # fmt: skip
        print(json.dumps({k: res[k] for k in ("name", "planned", "measured", "peak_moment")}), flush=True)
    print(
        fmt_table(
            rows,
            [
                "config",
                "measured MiB",
                "planned MiB",
                "total",
                "params",
                "grads",
                "optimizer",
                "act. kept",
                "working set",
                "rows/mean",
                "total spread MiB",
            ],
        )  # fmt: skip
    )
    device = torch.device("cuda" if gpus else "cpu")
    write_json(args.out, {"env": env_info(device), "results": out})


if __name__ == "__main__":
    main()
