"""Routing-fluctuation metric: the last-fluctuation-step distribution on a hand-made record, and the
probe in real training runs (Hash never fluctuates; the record survives a resume)."""

import json

import numpy as np
import pytest
from conftest import TINY, TINY_CONFIG, read_metrics, run_cli

from moetrain.moe.fluctuation import fluctuation_report, last_change_steps

# 4 tokens probed at steps 0, 10, 20, 30 (final = step 30 column):
#   t0: 0 0 0 0   never differs from final            -> L = 0
#   t1: 1 0 0 0   differs at step 0 only              -> L = 0
#   t2: 1 1 2 0   differs at 0, 10, 20                -> L = 20
#   t3: 0 1 0 1   differs at 0 and 20 (not at 10)     -> L = 20
STEPS = [0, 10, 20, 30]
IDS_PT = np.array([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 2, 0], [0, 0, 0, 1]])


def test_last_change_steps_hand_computed():
    assert last_change_steps(STEPS, IDS_PT).tolist() == [0, 0, 20, 20]


def test_report_hand_computed():
    report = fluctuation_report(STEPS, IDS_PT[:, None, :], total_steps=30)
    layer = report["layers"][0]
    # L > 3 -> 2/4, L > 6 -> 2/4, L > 15 -> 2/4, L > 24 -> 0
    assert layer["last_change_after"] == {"0.1": 0.5, "0.2": 0.5, "0.5": 0.5, "0.8": 0.0}
    # changed since the previous probe: 10 vs 0: t1, t3 -> .5; 20 vs 10: t2, t3 -> .5; 30 vs 20: t2, t3 -> .5
    assert layer["changed_since_previous"] == [0.5, 0.5, 0.5]
    assert report["probe_steps"] == STEPS and report["tokens"] == 4


def train(run_dir, data_cache, *overrides):
    proc = run_cli(
        "train",
        str(TINY_CONFIG),
        *TINY,
        f"data.cache_dir={data_cache}",
        f"run_dir={run_dir}",
        "moe.fluctuation.interval=2",
        "moe.fluctuation.blocks=4",
        *overrides,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def fluctuation(run_dir):
    return {r["step"]: r["moe/layer0/fluctuation"] for r in read_metrics(run_dir) if "moe/layer0/fluctuation" in r}


@pytest.mark.timeout(300)
def test_hash_routing_never_fluctuates_and_the_report_is_written(tmp_path, data_cache):
    run = tmp_path / "hash"
    train(run, data_cache, "train.steps=5", "moe.router={kind: hash}")
    assert fluctuation(run) == {2: 0.0, 4: 0.0, 5: 0.0}  # every 2 steps, and the last step
    report = json.loads((run / "fluctuation.json").read_text())
    assert report["probe_steps"] == [0, 2, 4, 5] and report["tokens"] == 4 * 32
    assert set(report["layers"][0]["last_change_after"].values()) == {0.0}
    assert sorted(p.name for p in (run / "fluctuation").iterdir()) == [f"step_{s:06d}.npy" for s in (0, 2, 4, 5)]


@pytest.mark.timeout(300)
def test_probe_record_survives_a_resume(tmp_path, data_cache):
    """Probes taken after the checkpoint of an interrupted run are dropped, so the record of a
    resumed run equals the uninterrupted run's (BASE: its routing does fluctuate)."""
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("train.steps=8", "moe.router={kind: base}", "optim.lr=1e-2")
    train(full, data_cache, *common)
    train(split, data_cache, *common, "train.stop_at_step=4", "checkpoint.interval=3")
    # the interrupted run probed at step 4 after its last checkpoint (3): that probe must go
    train(split, data_cache, *common, "checkpoint.resume=" + str(split / "checkpoints" / "step_000003"))
    assert fluctuation(split) == fluctuation(full)  # the resumed run's values win for steps it re-ran
    assert (split / "fluctuation.json").read_text() == (full / "fluctuation.json").read_text()
    assert any(v > 0 for v in fluctuation(full).values())
