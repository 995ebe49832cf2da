"""``moetrain launch --launcher slurm`` against a real one-node SLURM on this machine.

tests/slurm/start_slurm.sh installs (Debian's slurm-wlm and munge) and starts slurmctld and slurmd;
these tests skip only where that cannot be done (not root, no apt-get) and run everywhere else,
CI included. Each job is a 2-process CPU run of the tiny config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, TINY_CONFIG, run_cli
from test_launch_run import assert_two_rank_run

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

START_SLURM = REPO / "tests" / "slurm" / "start_slurm.sh"
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
}


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """Bring up the cluster (idempotent: about a second when it is already up); SLURM_CONF for clients."""
    proc = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"start_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    last = proc.stdout.strip().splitlines()[-1]
    return {"SLURM_CONF": last.removeprefix("export SLURM_CONF=")}


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=_env(env), timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def steps_logged(run: Path) -> list[int]:
    """Steps in metrics.jsonl so far (the line being written may be incomplete)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return out


def wait_until(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def final_state(job_id: str, env: dict[str, str], log: Path, timeout: float = 300) -> str:
    """The job's state once it has finished (COMPLETED, FAILED, ...)."""
    return wait_until(
        f"job {job_id} to finish",
        lambda: job_info(job_id, env).get("JobState") in FINISHED and job_info(job_id, env)["JobState"],
        timeout=timeout,
        log=log,
    )


def submit(run: Path, data_cache: str, env: dict[str, str], *extra: str) -> str:
    proc = run_cli(
        "launch",
        str(TINY_CONFIG),
        *TINY,
        f"data.cache_dir={data_cache}",
        f"run_dir={run}",
        "launch.env.OMP_NUM_THREADS=1",
        *extra,
        "--launcher",
        "slurm",
        "--procs-per-node",
        "2",
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^submitted batch job (\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


@pytest.mark.parametrize("mode", ["torchrun", "tasks"])
def test_slurm_job_trains_on_two_processes(mode, slurm_env, tmp_path, data_cache):
    """torchrun: one task runs `srun torchrun`; tasks: two SLURM tasks read their ranks from SLURM_*."""
    run = tmp_path / "run"
    job_id = submit(run, data_cache, slurm_env, "train.steps=4", "--slurm-mode", mode)
    log = run / f"slurm-{job_id}.out"
    assert final_state(job_id, slurm_env, log) == "COMPLETED", log.read_text()[-4000:]
    assert (run / "job.sbatch").is_file() and (run / "job.yaml").is_file()
    assert f"moetrain: job {job_id} on 1 node(s)" in log.read_text()
    assert_two_rank_run(run, steps=4)


def test_requeued_job_resumes_from_its_checkpoint(slurm_env, tmp_path, data_cache):
    """USR1 before the time limit -> the script requeues the job -> the next run resumes."""
    run = tmp_path / "run"
    job_id = submit(run, data_cache, slurm_env, "train.steps=100000", "checkpoint.interval=2", "--requeue")
    log = run / f"slurm-{job_id}.out"
    wait_until("a first checkpoint", lambda: list(run.glob("checkpoints/step_*/COMMITTED")), 300, log)
    # What SLURM sends signal_seconds before the time limit (--signal=B:USR1@N): USR1 to the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=_env(slurm_env), check=True)
    requeued = {"Restarts": "1", "JobState": "PENDING"}
    wait_until("the requeue", lambda: requeued.items() <= job_info(job_id, slurm_env).items(), 60, log)
    # SLURM holds a requeued job back for two minutes (Reason=BeginTime); release it now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=_env(slurm_env), check=True)
    resumed = wait_until(
        "the second run to resume",
        lambda: re.search(r"resumed from \S*step_(\d+) at step (\d+)", log.read_text()),
        300,
        log,
    )
    step = int(resumed.group(2))
    wait_until("a step after the resume", lambda: max(steps_logged(run), default=0) > step, 120, log)
    subprocess.run(["scancel", job_id], env=_env(slurm_env), check=True)
    text = log.read_text()
    assert f"moetrain: time limit near, requeueing job {job_id}" in text
    assert "restart 1" in text and step >= 2


def test_bad_partition_is_rejected_before_submission(slurm_env, tmp_path, capsys):
    run = tmp_path / "run"
    proc = run_cli(
        "launch",
        str(TINY_CONFIG),
        f"run_dir={run}",
        "--launcher",
        "slurm",
        "--partition",
        "nosuch",
        env=slurm_env,
    )
    assert proc.returncode == 2
    assert "launch.slurm.partition 'nosuch' does not exist on this cluster; partitions: debug (default)" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


def test_prepare_array_job_then_training(slurm_env, tmp_path):
    """--prepare: a two-source mixture is prepared by a 2-task array job; training starts after it
    (afterok) and finds both stores already prepared."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} file {i}\n" + f"some {name} text here\n" * 2000)
    sources = (
        f"data.sources=[{{name: first, paths: [{tmp_path / 'a'}], weight: 0.5}}, "
        f"{{name: second, paths: [{tmp_path / 'b'}], weight: 0.5}}]"
    )
    proc = run_cli(
        "launch", str(TINY_CONFIG), *TINY, f"data.cache_dir={cache}", f"run_dir={run}", sources,
        "launch.env.OMP_NUM_THREADS=1", "train.steps=4", "--launcher", "slurm", "--procs-per-node", "2", "--prepare",
        env=slurm_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = re.search(r"^submitted data preparation array job (\d+)$", proc.stdout, re.M).group(1)
    job_id = re.search(rf"^submitted batch job (\d+) \(starts after job {first} succeeds\)$", proc.stdout, re.M).group(
        1
    )
    log = run / f"slurm-{job_id}.out"
    assert final_state(job_id, slurm_env, log) == "COMPLETED", log.read_text()[-4000:]
    for task, name in enumerate(("first", "second")):
        text = (run / f"prepare-{first}_{task}.out").read_text()
        assert f"source {name!r}: prepared {cache}/" in text, text
    assert log.read_text().count("already prepared (nothing to tokenize)") == 2
    assert_two_rank_run(run, steps=4)
