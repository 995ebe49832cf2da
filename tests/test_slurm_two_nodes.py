"""``moetrain launch --launcher slurm --nodes 2`` end to end, on a real two-node SLURM on this machine.

tests/slurm/start_slurm_two_nodes.sh runs two slurmd daemons with distinct node names (moetrain-n0,
moetrain-n1) beside their own slurmctld; the job's sbatch script is the one users submit. Each job
trains EP 2 on 2 nodes x 2 processes (EP groups inside each node, expert-data-parallel groups across)
and must give the losses, grad-norms and final weights of one process on the same global batch.
Skips only where SLURM cannot be installed (as tests/test_slurm.py).
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO, TINY_CONFIG, run_cli
from test_expert_parallel import COMMON, assert_same_run, single
from test_slurm import final_state

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.timeout(900)]

START = REPO / "tests" / "slurm" / "start_slurm_two_nodes.sh"


@pytest.fixture(scope="module")
def two_nodes() -> dict[str, str]:
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"start_slurm_two_nodes.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return {"SLURM_CONF": proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")}


@pytest.mark.parametrize("mode", ["torchrun", "tasks"])
def test_two_node_job_trains_like_one_process(mode, two_nodes, tmp_path, data_cache):
    single(tmp_path / "one", data_cache, 8, "moe.router.top_k=2")
    run = tmp_path / "run"
    proc = run_cli(
        "launch", str(TINY_CONFIG), *COMMON, f"data.cache_dir={data_cache}", f"run_dir={run}",
        "launch.env.OMP_NUM_THREADS=1", "train.micro_batch_size=2", "moe.expert_parallel_size=2", "moe.router.top_k=2",
        "--launcher", "slurm", "--nodes", "2", "--procs-per-node", "2", "--slurm-mode", mode,
        env=two_nodes,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"^submitted batch job (\d+)$", proc.stdout, re.M).group(1)
    log = run / f"slurm-{job_id}.out"
    assert final_state(job_id, two_nodes, log) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert f"moetrain: job {job_id} on 2 node(s) [moetrain-n[0-1]]" in text
    assert (
        "placement: 2 node(s) (node 0: ranks [0,1]; node 1: ranks [2,3]); expert-parallel groups [0,1] [2,3] "
        "(each inside a node); expert-data-parallel groups [0,2] [1,3] (across nodes)"
    ) in text
    assert_same_run(tmp_path / "one", run)
