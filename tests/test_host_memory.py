"""``retain_freed_memory``: a freed large tensor's pages are reused, not faulted in again."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from moetrain.training.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for _ in range(8):  # warm-up (the heap settles within a few): 64 MiB allocated, touched and freed
    torch.ones(16 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(16 << 20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_large_tensors_stop_page_faulting():
    pages = (64 << 20) // 4096
    assert faults("default") >= 4 * pages  # each 64 MiB tensor is a fresh mmap: every page faults
    assert faults("retain") < pages // 10  # the freed heap memory is reused
