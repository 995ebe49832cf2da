"""Smoke test of bench/peers/autoep_e2e.py (DeepSpeed AutoEP is part of moetrain's DeepSpeed; the Hugging
Face model needs transformers, in the ``test`` extra): one shape, one repetition, a few steps per side.

The peer script follows moetrain's export and data APIs, so it breaks when they change; this run keeps it
working. No timing assertions: both sides trained, the same parameter count and the same step-1 loss (the
same model on the same batch), and the JSON row is consistent. torchtitan's comparison needs its own venv
(bench/peers/torchtitan_layer.py) and is not run here.
"""

import math

import pytest
from conftest import REPO, run_bench_quick

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]


def test_autoep_quick_trains_the_same_model_on_both_sides(tmp_path, data_cache):
    pytest.importorskip("transformers")
    result = run_bench_quick(REPO / "bench" / "peers" / "autoep_e2e.py", tmp_path / "autoep_e2e.json", data_cache)
    (row,) = result["rows"]
    assert (row["shape"], row["threads"], row["processes"]) == ("top2-e8-1t", 1, 1)
    assert row["moetrain_tokens_per_s"] > 0 and row["autoep_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["moetrain_tokens_per_s"] / row["autoep_tokens_per_s"])
    assert row["paired_ratios"] == [pytest.approx(row["ratio"])]  # one repetition: its pair is the ratio
    assert math.isfinite(row["moetrain_final_loss"]) and math.isfinite(row["autoep_final_loss"])
    assert row["params_moetrain"] == row["params_autoep"]
    assert row["moetrain_first_loss"] == pytest.approx(row["autoep_first_loss"], rel=1e-5)
    assert result["steps"] == 4 and result["zero_stage"] == 1 and result["allocator"] == "glibc"
    assert row["moetrain_runs_stage0"] is True  # one process: moetrain runs the asked ZeRO-1 as stage 0
