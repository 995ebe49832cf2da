"""Resharding: a checkpoint resumes at another world size, expert-parallel size or ZeRO stage (0-3).

Each case stops a run at step 3, resumes it to step 6 in another layout with the same global batch,
and compares every step's loss with a single-process run that never stopped (fp32, <= 1e-5 relative).
The next losses depend on every restored weight and Adam moment, per shared parameter and per
global expert, so a wrong or missing slice shows.
"""

from __future__ import annotations

import pytest
from conftest import read_metrics, run_train

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

GLOBAL_BATCH = 8  # sequences per step, whatever the layout
COMMON = ["train.steps=6", "checkpoint.interval=3", "moe.router.kind=topk", "moe.router.top_k=2"]


def layout(world: int, ep: int, zero: int = 0) -> list[str]:
    micro = GLOBAL_BATCH // world
    out = [
        f"train.micro_batch_size={micro}",
        f"moe.expert_parallel_size={ep}",
        f"deepspeed.zero_optimization.stage={zero}",
    ]
    if world == 1 and zero in (1, 2):  # ZeRO's own machinery (one process runs stage 0 by default)
        out.append("train.zero_on_one_process=true")
    if zero == 3:  # partition every parameter (stage 3 keeps those under 1e5 elements whole by default: all here)
        out.append("deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    return out


def run(run_dir, data_cache, world, *overrides, expect=0):
    proc = run_train(run_dir, data_cache, *COMMON, *overrides, nproc=world, timeout=500)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """One process, ZeRO-0, never stopped."""
    ref = tmp_path_factory.mktemp("reference")
    run(ref, data_cache, 1, *layout(1, 1))
    return losses(ref)


CASES = {
    "ws2-ep2 -> ws1": ((2, 2, 0), (1, 1, 0)),
    "ws1 -> ws4-ep4": ((1, 1, 0), (4, 4, 0)),
    "zero2 -> zero0": ((1, 1, 2), (1, 1, 0)),
    "ws2-ep2-zero1 -> ws2-ep1-zero2": ((2, 2, 1), (2, 1, 2)),
    # ZeRO-3 (experts partitioned over the expert-data-parallel group) to and from ZeRO 0-2
    "ws2-ep2-zero3 -> ws1": ((2, 2, 3), (1, 1, 0)),
    "ws1-zero2 -> ws4-ep2-zero3": ((1, 1, 2), (4, 2, 3)),
    "ws4-ep2-zero3 -> ws2-ep1-zero1": ((4, 2, 3), (2, 1, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_another_layout_equals_the_uninterrupted_run(case, tmp_path, data_cache, reference):
    (w1, ep1, z1), (w2, ep2, z2) = CASES[case]
    split = tmp_path / "split"
    run(split, data_cache, w1, *layout(w1, ep1, z1), "train.stop_at_step=3")
    proc = run(split, data_cache, w2, *layout(w2, ep2, z2))
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    got = losses(split)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, want in reference.items():
        assert abs(got[step] - want) <= 1e-5 * abs(want), (step, got[step], want)
