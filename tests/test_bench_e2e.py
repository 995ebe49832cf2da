"""Smoke tests of bench/e2e_lm.py (one shape, one repetition, a few steps, one process each side) and
bench/bf16_step.py.

No timing assertions (benchmarks print ratios, tests check plumbing): the JSON holds the row, both
sides trained (positive tokens/s, finite losses), the two models have the same parameter count, and,
dropless from the same weights on the same first batch, the same step-1 loss.
"""

import math
import sys

import pytest
from conftest import REPO, run_bench_quick

pytestmark = pytest.mark.timeout(300)


def test_e2e_lm_quick_writes_a_row_for_both_sides(tmp_path, data_cache):
    result = run_bench_quick(
        REPO / "bench" / "e2e_lm.py", tmp_path / "e2e_lm.json", data_cache, "--shapes", "top2-e8-1t", "--reps", "1"
    )
    (row,) = result["rows"]
    assert (row["shape"], row["variant"], row["threads"], row["processes"]) == ("top2-e8-1t", "plain", 1, 1)
    assert row["moetrain_tokens_per_s"] > 0 and row["deepspeed_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["moetrain_tokens_per_s"] / row["deepspeed_tokens_per_s"])
    assert row["moetrain_peak_rss_mb"] > 0 and row["deepspeed_peak_rss_mb"] > 0
    assert math.isfinite(row["moetrain_final_loss"]) and math.isfinite(row["deepspeed_final_loss"])
    assert row["params_moetrain"] == row["params_deepspeed"]
    assert row["moetrain_first_loss"] == pytest.approx(row["deepspeed_first_loss"], rel=1e-5)
    assert result["env"]["deepspeed"] and result["load_avg_before"] and result["steps"] == 4
    assert row["moetrain_busiest_rank_load"] is None  # one process: no ranks to compare


def test_busiest_rank_load_reads_the_per_expert_loads_by_rank_block():
    sys.path.insert(0, str(REPO))
    from bench.e2e_lm import busiest_rank_load

    # 4 experts on 2 ranks: rank 0 holds experts 0-1, rank 1 experts 2-3
    records = [
        {"loss": 3.0, "moe/layer0/load": [30.0, 10.0, 0.0, 0.0], "moe/layer1/load": [10.0, 10.0, 10.0, 10.0]},
        {"moe/layer0/load": [0.0, 10.0, 20.0, 10.0]},  # 10 vs 30 rows
    ]
    assert busiest_rank_load(records, 2) == pytest.approx((2.0 + 1.0 + 1.5) / 3)
    assert busiest_rank_load(records, 1) is None


def test_bf16_step_quick_times_both_optimizer_steps(tmp_path, data_cache):
    """bench/bf16_step.py: one bf16 run whose optimizer wrapper alternates between DeepSpeed's step and
    moetrain's grouped step; both are timed, and the run trains (the child asserts the grouped step is
    what moetrain installed)."""
    result = run_bench_quick(REPO / "bench" / "bf16_step.py", tmp_path / "bf16_step.json", data_cache)
    (row,) = result["rows"]
    assert row["shape"] == "top1-e8-1t" and result["steps"] == 4 and "train.precision=bf16" in result["overrides"]
    assert row["samples"]["deepspeed"] >= 1 and row["samples"]["grouped"] >= 1 and row["samples"]["train_step"] >= 1
    assert row["deepspeed_step_ms"] > 0 and row["grouped_step_ms"] > 0 and row["train_step_ms"] > row["grouped_step_ms"]
    assert row["saved_ms"] == pytest.approx(row["deepspeed_step_ms"] - row["grouped_step_ms"])
