"""``retain_freed_memory``: a freed large tensor's pages are reused, not faulted in again.
``bound_kernel_caches``: bf16 matmuls of ever new row counts (an expert's rows, step after step) stop
growing the resident set by one cached kernel per shape."""

import os
import re
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from moetrain.training.host_memory import retain_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for _ in range(8):  # warm-up (the heap settles within a few): 64 MiB allocated, touched and freed
    torch.ones(16 << 20).sum()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
PAGES = (64 << 20) // 4096


def faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_large_tensors_stop_page_faulting():
    assert all(n >= PAGES for n in faults("default"))  # each 64 MiB tensor is a fresh mmap: every page faults
    # the freed heap memory is reused. NOTE: the least of 6 iterations, not most of them: on this project's
    # CI VMs a DAMON kernel daemon pages out memory it finds cold (/sys/kernel/mm/damon), retained heap
    # pages included, and a fresh-clone run of the whole suite saw 3 of 6 iterations fault every page. An
    # allocator that did not retain would fault every page in every iteration, as "default" does.
    assert min(faults("retain")) < PAGES // 10


CACHE_PROBE = """
import sys, torch
from moetrain.training.host_memory import bound_kernel_caches
torch.set_num_threads(1)
if sys.argv[1] == "bounded":
    bound_kernel_caches(64)
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = torch.randn(128, 512, dtype=torch.bfloat16)
x = torch.randn(700, 128, dtype=torch.bfloat16)
for rows in range(1, 20):
    x[:rows] @ w
before = resident_mb()
for rows in range(20, 620):  # 600 shapes never seen before, as an expert's row counts over many steps
    x[:rows] @ w
print(resident_mb() - before)
"""


def onednn_bf16() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


requires_onednn_bf16 = pytest.mark.skipif(
    sys.platform != "linux" or not onednn_bf16(),
    reason="bf16 matmuls do not go through oneDNN in this torch build / on this CPU: no kernel cache to bound",
)


def growth_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@requires_onednn_bf16
def test_bounded_kernel_caches_stop_growing_with_new_shapes():
    default = growth_mb("default")
    bounded = growth_mb("bounded")
    assert default > 100, f"600 new bf16 matmul shapes grew memory by only {default:.0f} MB without a bound"
    assert bounded < default / 3, (default, bounded)  # measured: about 420 MB vs 50 MB


REVISIT_PROBE = """
import sys, torch
from moetrain.training.host_memory import bound_kernel_caches
torch.set_num_threads(1)
if sys.argv[1] == "bounded":
    bound_kernel_caches(2)
w = torch.randn(128, 512, dtype=torch.bfloat16)
x = torch.randn(64, 128, dtype=torch.bfloat16)
for rows in (5, 6, 7, 5):  # the last shape was seen three shapes ago
    x[:rows] @ w
"""


@requires_onednn_bf16
def test_bounded_kernel_caches_evict_old_shapes():
    """The mechanism, not the memory: ``bound_kernel_caches`` sets oneDNN's cache capacity before oneDNN
    reads it, so with room for 2 kernels a shape seen three shapes ago is compiled again (a cache miss);
    with the library's default it is found (a hit). oneDNN reports each kernel creation."""
    creations = {}
    for mode in ("default", "bounded"):
        env = {**os.environ, "ONEDNN_VERBOSE": "profile_create"}
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        out = subprocess.run([sys.executable, "-c", REVISIT_PROBE, mode], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        creations[mode] = re.findall(r"create:(cache_\w+),cpu,matmul", out.stdout + out.stderr)
    assert creations["default"] == ["cache_miss"] * 3 + ["cache_hit"]
    assert creations["bounded"] == ["cache_miss"] * 4


def test_kernel_cache_settings_from_the_environment_win(monkeypatch):
    from moetrain.training.host_memory import KERNEL_CACHE_VARS, bound_kernel_caches

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    assert bound_kernel_caches(64) == {KERNEL_CACHE_VARS[0]: "8", KERNEL_CACHE_VARS[1]: "64"}
    with pytest.raises(ValueError, match=">= 1"):
        bound_kernel_caches(0)
