"""scripts/gpu_check.sh, the one prepared GPU check, runs end to end on the CPU (--smoke), so it cannot rot."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import HAS_CUDA, REPO, clean_env


@pytest.mark.timeout(1200)
def test_gpu_check_smoke_runs_every_step(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=1150,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = record["steps"]
    assert list(steps) == [
        "gpu_tests", "train_tiny_fp32", "train_swiglu_top2_bf16", "host_syncs", "bench", "e2e", "nccl_resume",
        "uninitialised_rows", "torchtitan_layer",
    ]  # fmt: skip
    # torchtitan lives in its own environment: skipped unless MOETRAIN_PEER_TORCHTITAN_PYTHON names one
    assert steps.pop("torchtitan_layer")["status"] in ("pass", "skipped")
    assert all(s["status"] == "pass" for s in steps.values()), {k: s["status"] for k, s in steps.items()}
    for name in ("train_tiny_fp32", "train_swiglu_top2_bf16"):
        runs = steps[name]["runs"]
        assert steps[name]["max_rel_loss_diff"] <= steps[name]["tolerance"]
        assert len(runs["triton"]["loss"]) == 3 and runs["triton"]["grouped_gemm_fallback_layers"] == 0
    for case in ("topk2_swiglu", "stablemoe_stacked"):  # counted, by a counter that saw a deliberate sync
        assert steps["host_syncs"][case]["host_syncs"] == 0 and steps["host_syncs"][case]["calibration_syncs"] >= 1
    assert " passed" in steps["gpu_tests"]["summary"]
    assert steps["nccl_resume"]["backend"] == "gloo" and steps["nccl_resume"]["bf16"]["losses"] == 6
    assert set(steps["uninitialised_rows"]) >= {"capacity", "null_experts", "expert_choice"}
    assert (tmp_path / "gpu_tier.json").is_file()
    e2e = json.loads((tmp_path / "e2e_lm_gpu.json").read_text())  # the bf16 baseline path, on the CPU here
    assert e2e["precision"] == "bf16" and [r["shape"] for r in e2e["rows"]] == ["top2-e8-1t"]
    assert steps["e2e"]["ratios"]["top2-e8-1t"] > 0
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| train_swiglu_top2_bf16 | pass |" in summary and "## bench/gpu_tier.py" in summary
    assert "## bench/e2e_lm.py" in summary


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_gpu_check_without_a_gpu_says_so():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU here; run with --smoke" in proc.stderr


def test_a_test_step_where_every_test_skipped_fails():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.check_some_passed("3 passed, 2 skipped in 1.0s")
    for tail in ("12 skipped in 0.5s", "no tests ran in 0.01s", "2 deselected in 0.1s"):
        with pytest.raises(RuntimeError, match="no selected test ran"):
            gpu_check.check_some_passed(tail)
    # the summary is found where it is, not taken as the last line: pytest-benchmark prints after it
    output = "....\n===== 8 passed, 3 deselected in 3.43s =====\n  warner(PytestBenchmarkWarning(text))\n"
    assert gpu_check.pytest_summary(output) == "8 passed, 3 deselected in 3.43s"
    with pytest.raises(RuntimeError, match="no selected test ran"):
        gpu_check.pytest_summary("ERROR: usage: pytest [options]\n")
