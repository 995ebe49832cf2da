"""Shared benchmark plumbing: environment record, interleaved timing, counters, JSON output.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

Rules (docs/benchmarks.md): variants run interleaved (A, B, A, B, ...) after warm-up, the median of
>= 11 repetitions is reported, and every run writes one JSON with the shapes, seeds, library versions
and the device it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.parallel.layout import free_port

MIN_REPS = 11


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args: str) -> str:
    try:
        cwd = Path(__file__).resolve().parent
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd).stdout.strip()
    except OSError:
        return ""


def env_info(device: torch.device) -> dict:
    """Versions and the device, for the JSON record."""
    import deepspeed

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = (
        _git("rev-parse", "--short", "HEAD"),
        _git("status", "--porcelain", "--untracked-files=no"),
    )
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "git_commit": commit or None,
        "git_modified_files": [line.strip() for line in dirty.splitlines()],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]
    return info


def interleaved_medians(
    variants: dict[str, Callable[[], object]],
    reps: int = MIN_REPS,
    warmup: int = 2,
    sync: Callable = lambda: None,
) -> dict[str, dict]:
    """Median wall time of each variant, run A, B, C, A, B, C, ... after ``warmup`` rounds.

    Also records the process CPU time of each call (``cpu_median_s``): on a shared machine it is far
    less sensitive to other processes than wall time (meaningless on a GPU, where the host waits).
    """
    reps = max(reps, MIN_REPS)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + reps):
        for name, fn in variants.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            if round_ >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(ts),
            "q1_s": statistics.quantiles(ts, n=4)[0],
            "q3_s": statistics.quantiles(ts, n=4)[2],
            "cpu_median_s": statistics.median(cpu[name]),
            "reps": len(ts),
        }
        for name, ts in wall.items()
    }


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------- counters


def _grouped_mm_flops(a_shape, b_shape, offs_shape=None, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm from shapes (the flop counter has no formula for it in torch 2.13).

    NOTE: shapes only, so with ``offs`` every row of the 2-D operand counts as computed: exact when
    dropless (every row belongs to an expert), an over-count of the unused capacity rows otherwise.
    """
    if len(a_shape) == 2 and len(b_shape) == 3:  # [M, K] x [G, K, N], groups along M
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [G, M, K] x [K, N], groups along N
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [M, K] x [K, N], groups along K -> [G, M, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # batched


if torch.ops.aten._grouped_mm not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


def count_flops(fn: Callable[[], object]) -> int:
    with flop_counter.FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


class AtenOpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it (views included: each is a Python-visible launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def saved_activation_bytes(fn: Callable[[], object], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages and storage.data_ptr() != 0:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def init_single_process_deepspeed() -> None:
    """DeepSpeed's MoE needs torch.distributed and its groups; one gloo process is enough."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def fmt_table(rows: list[list[object]], header: list[str]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
