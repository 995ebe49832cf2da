"""Bitwise reproducibility at the default thread count, through the real CLI (README, "Resuming"), for
StableMoE's stacked experts and the grouped-GEMM experts (top-2 SwiGLU, top-1 GELU in capacity mode).

The shape matters. A CPU kernel that accumulates with atomics runs serially below 32768 elements, so
the ``TINY`` model (128 tokens of width 32) never reaches a racing path. ``WIDE`` routes 512 tokens of width 64 (expert
hidden 128), so the stacked experts' per-row gradients cross that size: there the old backward of
``param[rows]`` raced: two fresh runs of one seed ended 8 steps with different weights in each of 4
tries (the losses apart from step 4 or 6, or not yet). The runs of a pair go side by side, which only
makes such races likelier.
"""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import TINY_CONFIG, clean_env, read_metrics, run_cli

from moetrain.checkpoint import consolidated_state_dict

pytestmark = pytest.mark.timeout(300)

WIDE = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=128",
    "model.max_seq_len=64",
    "moe.num_experts=4",
    "moe.expert_hidden=128",
    "data.seq_len=64",
    "data.max_tokens=200000",
    "train.micro_batch_size=8",
    "train.eval_batches=2",
    "train.steps=8",
    "logging.interval=1",
    "optim.warmup_steps=2",
]


@pytest.fixture(autouse=True)
def default_threads(monkeypatch):
    """The children get torch's default thread count (a thread limit set for the test run is dropped)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    )
    if int(probe.stdout) < 2:
        pytest.skip("one intra-op thread: every kernel runs serially, nothing here could differ")


def train_together(data_cache, *runs):
    """Start several ``(run_dir, overrides)`` trainings at once; wait for all of them."""

    def one(run):
        run_dir, overrides = run
        proc = run_cli(
            "train", str(TINY_CONFIG), *WIDE, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", *overrides
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(one, runs))


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def final_weights(run_dir):
    return consolidated_state_dict(max((run_dir / "checkpoints").glob("step_*")))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


# tiny.yaml's StableMoE with stacked experts (per-row LayerNorm/bias gathers), and the grouped-GEMM
# paths: a Llama backbone with top-2 SwiGLU experts, and top-1 GELU experts in capacity mode.
MODELS = {
    "stablemoe-stacked": [],
    "topk2-swiglu-llama": ["model.arch=llama", "moe.router={kind: topk, top_k: 2, renormalize: true}"],
    "topk1-gelu-capacity": ["moe.expert_type=gelu", "moe.router={kind: topk, top_k: 1}", "moe.capacity_factor=1.0"],
}
CASES = [
    ("stablemoe-stacked", "train.deterministic=true"),
    *((model, "train.deterministic=false") for model in MODELS),
]


@pytest.mark.parametrize("model,mode", CASES, ids=[f"{m}-{d.split('=')[1]}" for m, d in CASES])
def test_two_fresh_runs_are_bitwise_equal(tmp_path, data_cache, model, mode):
    # Default mode too: moetrain's model avoids the racing kernels on every path (a regression test).
    a, b = tmp_path / "a", tmp_path / "b"
    overrides = [mode, *MODELS[model]]
    train_together(data_cache, (a, overrides), (b, overrides))
    assert sorted(losses(a)) == list(range(1, 9))
    assert losses(a) == losses(b)  # exact float equality, every step
    assert_same_weights(final_weights(a), final_weights(b))


def test_resume_after_k_equals_uninterrupted_bitwise(tmp_path, data_cache):
    full, split = tmp_path / "full", tmp_path / "split"
    det = "train.deterministic=true"
    train_together(data_cache, (full, [det]), (split, [det, "train.stop_at_step=3"]))
    assert max(losses(split)) == 3
    (proc,) = train_together(data_cache, (split, [det]))
    assert "resumed from" in proc.stdout
    assert losses(split) == losses(full)
    assert_same_weights(final_weights(split), final_weights(full))
