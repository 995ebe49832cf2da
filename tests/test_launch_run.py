"""Real launches through ``moetrain launch``: torchrun and the deepspeed launcher, 2 CPU processes each.

Each run must finish and leave a run directory written by both ranks: rank 0's metrics covering every
step with the global batch of two ranks, and a committed checkpoint holding each rank's state file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY, TINY_CONFIG, read_metrics, run_cli

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

MICRO_BATCH, SEQ_LEN = 4, 32  # from conftest.TINY


def assert_two_rank_run(run: Path, steps: int) -> None:
    """The run dir holds rank 0's metrics for every step and a checkpoint with both ranks' state."""
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[-1]["tokens"] == steps * 2 * MICRO_BATCH * SEQ_LEN  # both ranks fed every step
    ckpt = run / "checkpoints" / f"step_{steps:06d}"
    assert (ckpt / "COMMITTED").is_file()
    assert (ckpt / "rng" / "rank_00000.json").is_file() and (ckpt / "rng" / "rank_00001.json").is_file()
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert (run / "config.yaml").is_file()


def launch_args(run: Path, data_cache: str, *extra: str) -> list[str]:
    return [
        "launch",
        str(TINY_CONFIG),
        *TINY,
        f"data.cache_dir={data_cache}",
        f"run_dir={run}",
        "launch.env.OMP_NUM_THREADS=1",
        *extra,
    ]


def python_alone(folder: Path) -> Path:
    """A ``python`` that runs this interpreter, in a folder with no ``torchrun`` or ``deepspeed`` script
    beside it (as in a venv built with --system-site-packages, or a pip --user install)."""
    folder.mkdir()
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_process_cpu_launch_finishes(launcher, tmp_path, data_cache):
    """The launcher runs as a module of launch.python: no console script beside it is needed."""
    run, python = tmp_path / "run", python_alone(tmp_path / "bin")
    args = ["train.steps=4", f"launch.python={python}", "--launcher", launcher, "--procs-per-node", "2"]
    proc = run_cli(*launch_args(run, data_cache, *args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    module = "torch.distributed.run --standalone" if launcher == "torchrun" else "deepspeed.launcher.runner --num_gpus"
    assert "moetrain launch: OMP_NUM_THREADS=1 " in proc.stderr and f"{python} -m {module}" in proc.stderr
    assert_two_rank_run(run, steps=4)


def test_failed_worker_fails_the_launch(tmp_path, data_cache):
    """A training error inside the workers reaches the caller as a non-zero exit code."""
    run = tmp_path / "run"
    bad_resume = f"checkpoint.resume={tmp_path / 'nowhere'}"  # each worker exits 2 on it
    proc = run_cli(*launch_args(run, data_cache, bad_resume, "--procs-per-node", "2"))
    assert proc.returncode != 0
    assert "is not a folder" in proc.stderr
