"""``retain_freed_memory``: a freed large tensor's pages are reused, not faulted in again."""

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
    # the freed heap memory is reused (an occasional iteration may still fault on a busy machine)
    assert sorted(faults("retain"))[3] < PAGES // 10
