"""Each rank hashes the checkpoint files it wrote, at the same time as the others: rank 0 does not hash
every rank's files while the others wait inside a collective with a timeout."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, TINY, TINY_CONFIG, clean_env

PLUGIN = REPO / "tests" / "plugins" / "hash_log.py"


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_every_rank_hashes_its_own_files(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PLUGIN)]
    cmd += ["train", str(TINY_CONFIG), *TINY, f"data.cache_dir={data_cache}", f"run_dir={run}"]
    cmd += ["train.steps=2", "checkpoint.interval=2", "moe.expert_parallel_size=2", "checkpoint.resume=none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hashed = {r: set((run / f"hashed_rank{r}.txt").read_text().split()) for r in (0, 1)}
    tmp = ".tmp_step_000002"
    rank1_files = {f"{tmp}/experts_00001.safetensors", "rng/rank_00001.json"}
    assert rank1_files <= hashed[1] and not rank1_files & hashed[0]
    assert {f"{tmp}/shared.safetensors", f"{tmp}/experts_00000.safetensors", f"{tmp}/state.json"} <= hashed[0]
