"""Optimizer-state offload (ZeRO-1/2 + DeepSpeed's CPU Adam) equals training without it (fp32, gloo).

- one process and EP 2: the same per-step losses and grad-norms (rel 1e-5) and final weights (atol 2e-5)
  as one process without offload (the helpers and tolerances of test_expert_parallel.py);
- checkpoints are layout-free: a run saved with offload resumes without it, on another world size and
  EP size, and the other way round, with the losses of the run that never stopped;
- where the CPU Adam extension can be neither loaded nor built, ``moetrain train`` stops first (exit 2).
"""

from __future__ import annotations

import pytest
from conftest import REPO, TINY_CONFIG, read_metrics, run_cli
from test_expert_parallel import COMMON, STEPS, assert_same_run, single, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]

ZERO2 = "deepspeed.zero_optimization.stage=2"
OFFLOAD = "deepspeed.zero_optimization.offload_optimizer.device=cpu"


def test_offload_equals_no_offload_on_one_process(tmp_path, data_cache):
    single(tmp_path / "plain", data_cache, 4, ZERO2, "moe.router.top_k=2")
    single(tmp_path / "offload", data_cache, 4, ZERO2, OFFLOAD, "moe.router.top_k=2")
    assert_same_run(tmp_path / "plain", tmp_path / "offload")


def test_offload_under_ep2_equals_one_process(tmp_path, data_cache):
    single(tmp_path / "one", data_cache, 4, ZERO2, "moe.router.top_k=2")
    torchrun(
        2, tmp_path / "ep", data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2",
        "moe.router.top_k=2", ZERO2, OFFLOAD,
    )  # fmt: skip
    assert_same_run(tmp_path / "one", tmp_path / "ep")


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_offload_checkpoints_resume_without_offload_elsewhere_and_back(tmp_path, data_cache):
    """EP 2 with offload, stopped at step 2, resumes on one process without offload; one process
    without offload, stopped at step 2, resumes under EP 2 with offload: both continue the run that
    never stopped (one process, no offload) to fp32 rounding."""
    ckpt = ["checkpoint.resume=auto", "checkpoint.interval=2", ZERO2]
    single(tmp_path / "full", data_cache, 4, *ckpt)
    full = _losses(tmp_path / "full")

    a = tmp_path / "offload_then_plain"
    torchrun(2, a, data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2", *ckpt, OFFLOAD,
             "train.stop_at_step=2")  # fmt: skip
    single(a, data_cache, 4, *ckpt)
    b = tmp_path / "plain_then_offload"
    single(b, data_cache, 4, *ckpt, "train.stop_at_step=2")
    torchrun(2, b, data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2", *ckpt, OFFLOAD)
    for run in (a, b):
        got = _losses(run)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert got[step] == pytest.approx(full[step], rel=1e-5), (run.name, step, got[step], full[step])


@pytest.mark.timeout(120)
def test_offload_without_a_buildable_cpu_adam_stops_before_setup(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = run_cli(
        "train", str(TINY_CONFIG), *COMMON, f"data.cache_dir={data_cache}", f"run_dir={run}", ZERO2, OFFLOAD,
        env={"CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path / "no_extensions")},
        cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "offload_optimizer.device (cpu) steps the optimizer with DeepSpeed's CPU Adam" in proc.stderr
    assert "no C++ compiler '/nonexistent/c++'" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()
