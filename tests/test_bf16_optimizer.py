"""bf16 through DeepSpeed's ``BF16_Optimizer``: what DeepSpeed 0.19.8 picks for bf16 with ZeRO-1 and fp32
gradient accumulation (``deepspeed.data_types.grad_accum_dtype: fp32``), on any device (the table of
wrappers: docs/parallelism.md, "Precision"). Expert-gradient reduction, the gradient norm under EP and the
checkpoint's state access all go through it: EP 2 against one process, and an exact resume."""

import pytest
from conftest import read_metrics
from test_expert_parallel import STEPS, single, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]

BF16_OPTIMIZER = [
    "train.precision=bf16",
    "deepspeed.zero_optimization.stage=1",
    "deepspeed.data_types={grad_accum_dtype: fp32}",
    "moe.router.top_k=2",
]


def _rows(run):
    return [r for r in read_metrics(run) if "loss" in r]


def test_bf16_optimizer_under_ep_equals_one_process(tmp_path, data_cache):
    """bf16 compute: the per-step losses and grad norms agree to bf16 rounding (2e-2 relative), not fp32's
    1e-5; the expert loads (integers) exactly."""
    single(tmp_path / "one", data_cache, 4, *BF16_OPTIMIZER)
    proc = torchrun(
        2, tmp_path / "ep", data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2", *BF16_OPTIMIZER
    )
    assert "inside DeepSpeed's BF16_Optimizer" in proc.stdout
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "ep")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-2), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=5e-2), (x["step"], x["grad_norm"], y["grad_norm"])
    assert a[0]["moe/layer0/load"] == b[0]["moe/layer0/load"]  # the first step routes the same tokens alike


def test_bf16_optimizer_resume_under_ep_equals_the_uninterrupted_run(tmp_path, data_cache):
    args = ["train.micro_batch_size=2", "moe.expert_parallel_size=2", "checkpoint.resume=auto", *BF16_OPTIMIZER]
    torchrun(2, tmp_path / "full", data_cache, *args)
    torchrun(2, tmp_path / "split", data_cache, *args, "train.stop_at_step=2")
    proc = torchrun(2, tmp_path / "split", data_cache, *args)
    assert "resumed from" in proc.stdout
    full = {r["step"]: r["loss"] for r in _rows(tmp_path / "full")}
    assert {r["step"]: r["loss"] for r in _rows(tmp_path / "split")} == full  # exact, every step
