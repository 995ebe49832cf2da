"""moetrain's grouped step for DeepSpeed's bf16 optimizer at ZeRO-0 (moetrain/training/unfused_bf16.py)
makes DeepSpeed's own update: compared step for step with ``FP16_UnfusedOptimizer.step`` on the same
model and batches, with and without clipping, with a parameter that gets no gradient and with a step whose
gradient is not finite."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics
from distributed import run_distributed, tiny_ep_model
from test_expert_parallel import STEPS, single, torchrun

from moetrain.training import unfused_bf16


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 32)
        self.b = torch.nn.Linear(32, 4)
        self.unused = torch.nn.Linear(4, 4)  # never gets a gradient: DeepSpeed steps it with zeros

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def _engine(grouped: bool, clip: float, world: int):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from moetrain.training.engine import initialize_engine

    torch.manual_seed(0)
    model = Net()
    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 0},
        "gradient_clipping": clip,
    }
    engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1), None, ds, world)
    assert type(engine.optimizer) is unfused_bf16.grouped_step_class()  # what moetrain runs
    if not grouped:
        engine.optimizer.__class__ = FP16_UnfusedOptimizer  # DeepSpeed's own step, as a reference
    return engine


def _run(engine, batches, poison_step: int | None = None):
    norms, weights = [], []
    for i, (x, scale) in enumerate(batches):
        loss = engine(x).float().square().sum() * scale
        if i == poison_step:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        norms.append((engine.get_global_grad_norm(), engine.optimizer.overflow))
        weights.append([p.detach().clone() for p in engine.module.parameters()])
    return norms, weights, engine


def _same_updates(rank: int, world: int) -> None:
    torch.manual_seed(1)
    # the loss scale makes the gradient norms go from far under the clip (0.01) to far over it (100)
    batches = [(torch.randn(4, 8).bfloat16(), s) for s in (0.01, 0.01, 100.0, 0.01, 100.0, 0.01)]
    for clip in (0.0, 1.0):
        ref_norms, ref_weights, ref = _run(_engine(False, clip, world), batches)
        norms, weights, eng = _run(_engine(True, clip, world), batches)
        assert not any(over for _, over in norms + ref_norms)
        norms, ref_norms = [n for n, _ in norms], [n for n, _ in ref_norms]
        assert norms == pytest.approx(ref_norms, rel=1e-6), clip
        clipped_yet = False
        for step, (ws, rs) in enumerate(zip(weights, ref_weights)):
            clipped_yet = clipped_yet or (clip > 0 and ref_norms[step] > clip)
            for w, r in zip(ws, rs):
                # bitwise until a clipping factor (computed from norms summed in another order) has been applied
                tol = 1e-5 if clipped_yet else 0.0
                torch.testing.assert_close(w.float(), r.float(), rtol=tol, atol=tol)
        assert any(n > clip for n in ref_norms) if clip else True
        # the unused layer was stepped with zero gradients (weight decay moved it), as DeepSpeed does
        assert not torch.equal(eng.module.unused.weight, _engine(False, clip, world).module.unused.weight)
        # the Adam state and its checkpoint layout are DeepSpeed's
        a, b = eng.optimizer.state_dict(), ref.optimizer.state_dict()
        assert a.keys() == b.keys()
        for ga, gb in zip(a["fp32_groups"], b["fp32_groups"]):
            for x, y in zip(ga, gb):
                torch.testing.assert_close(x, y, rtol=1e-5 if clip else 0.0, atol=1e-5 if clip else 0.0)


def _skips_a_nonfinite_step(rank: int, world: int) -> None:
    torch.manual_seed(1)
    batches = [(torch.randn(4, 8).bfloat16(), 1.0) for _ in range(3)]
    for grouped in (True, False):
        norms, weights, engine = _run(_engine(grouped, 1.0, world), batches, poison_step=1)
        assert [over for _, over in norms] == [False, True, False], grouped
        assert norms[1][0] == float("inf"), grouped
        assert engine.skipped_steps == 1, grouped
        for w, before in zip(weights[1], weights[0]):
            assert torch.equal(w, before), grouped  # the poisoned step changed no weight
        assert all(p.grad is None for g in engine.optimizer.fp32_groups for p in g), grouped
        assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[1])), grouped  # stepped again
    ref = _run(_engine(False, 1.0, world), batches, poison_step=1)
    new = _run(_engine(True, 1.0, world), batches, poison_step=1)
    for w, r in zip(new[1][2], ref[1][2]):  # and the next step is the same update again
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-5)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_the_grouped_step_makes_deepspeeds_update():
    run_distributed(_same_updates, 1)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_the_grouped_step_skips_a_nonfinite_step_as_deepspeed_does():
    run_distributed(_skips_a_nonfinite_step, 1)


class _Wrapper:
    """The attributes of FP16_UnfusedOptimizer that decide whether the grouped step applies."""

    def __init__(self, fused_lamb_legacy=False, mpu=None, moe=False) -> None:
        self.fused_lamb_legacy = fused_lamb_legacy
        self.mpu = mpu
        self.overflow_checker = type("Checker", (), {"has_moe_params": moe})()


def test_the_grouped_step_applies_only_where_every_rank_computes_the_same_norm(monkeypatch):
    monkeypatch.setattr(unfused_bf16, "_unfused_class", lambda: _Wrapper)
    assert unfused_bf16.grouped_step_applies(_Wrapper(), 1, False)
    assert unfused_bf16.grouped_step_applies(_Wrapper(), 4, True)  # gradients all-reduced before the step
    assert not unfused_bf16.grouped_step_applies(_Wrapper(), 4, False)  # DeepSpeed all-reduces its verdict
    assert not unfused_bf16.grouped_step_applies(_Wrapper(moe=True), 1, False)  # experts, no group to sum over
    assert unfused_bf16.grouped_step_applies(_Wrapper(moe=True), 4, True, ep_group=object())
    assert not unfused_bf16.grouped_step_applies(_Wrapper(mpu=object()), 1, False)
    assert not unfused_bf16.grouped_step_applies(_Wrapper(fused_lamb_legacy=True), 1, False)
    assert not unfused_bf16.grouped_step_applies(object(), 1, False)  # another wrapper (ZeRO, BF16_Optimizer)


def test_the_gradient_norm_is_deepspeeds():
    torch.manual_seed(0)
    grads = [torch.randn(n).bfloat16().float() for n in (3, 1000, 77)]
    expected = sum(float(g.norm()) ** 2 for g in grads) ** 0.5
    assert unfused_bf16.grad_norm(grads) == pytest.approx(expected, rel=1e-7)
    assert unfused_bf16.grad_norm([]) == 0.0
    grads[1][5] = float("inf")
    assert unfused_bf16.grad_norm(grads) == float("inf")
    grads[1][5] = float("nan")
    assert unfused_bf16.grad_norm(grads) != unfused_bf16.grad_norm(grads)  # NaN


def _ep_norm(rank: int, world: int) -> None:
    from moetrain.parallel.grad_norm import clip_grad_norm
    from moetrain.training.engine import initialize_engine
    from moetrain.training.optim import param_groups

    model, layout = tiny_ep_model(2)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, 2), lr=0.01)
    ds = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    engine = initialize_engine(model, optimizer, None, ds, world, layout.ep_group)
    assert type(engine.optimizer) is unfused_bf16.grouped_step_class() and any(engine.optimizer.expert_flags)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))  # each rank its batch
    engine.backward(engine(tokens[:, :-1], tokens[:, 1:]).loss)
    expected = float(clip_grad_norm(engine.module, 0.0, layout.ep_group))  # moetrain's EP-aware norm, tested
    from deepspeed.moe.utils import is_moe_param

    grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None and not is_moe_param(p)]
    deepspeeds = sum(float(g.norm()) ** 2 for g in grads) ** 0.5  # what FP16_UnfusedOptimizer.step would clip by
    assert abs(deepspeeds - expected) > 1e-4 * expected  # so this test tells the two apart
    engine.step()
    got = engine.get_global_grad_norm()
    assert got == pytest.approx(expected, rel=1e-6), (got, expected)
    norms = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    torch.distributed.all_gather(norms, torch.tensor([got], dtype=torch.float64))
    assert norms[0] == norms[1]  # one norm, so one clipping factor and one skip decision, on every rank


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_under_expert_parallelism_the_norm_counts_every_expert_once():
    """DeepSpeed's own step leaves the expert-tagged gradients out of the norm (0.3-0.4 % low on the tiny
    config; docs/parallelism.md); the grouped step sums them over the expert-parallel group."""
    run_distributed(_ep_norm, 2)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("ep_size", [2, 1], ids=["ep2", "dp2"])
def test_bf16_at_zero0_on_two_ranks_trains_like_one_process(tmp_path, data_cache, ep_size):
    """The default stage in bf16 on two ranks, under EP 2 (refused before the grouped step) and data
    parallel: per-step losses and gradient norms to bf16 rounding of one process's (the tolerances of
    tests/test_bf16_optimizer.py)."""
    args = ["train.precision=bf16", "moe.router.top_k=2"]
    single(tmp_path / "one", data_cache, 4, *args)
    ep = torchrun(
        2, tmp_path / "ep", data_cache, "train.micro_batch_size=2", f"moe.expert_parallel_size={ep_size}", *args
    )
    assert "inside DeepSpeed's FP16_UnfusedOptimizer (moetrain's grouped step)" in ep.stdout
    a, b = ([r for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("one", "ep"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-2), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=5e-2), (x["step"], x["grad_norm"], y["grad_norm"])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_bf16_at_zero0_under_ep_resumes_exactly_and_on_one_process(tmp_path, data_cache):
    """Stopped at step 2 and resumed under EP 2: every loss equals the uninterrupted EP-2 run's; the same
    checkpoint resumed on one process continues it to bf16 rounding (checkpoints are layout-free)."""
    args = ["train.precision=bf16", "moe.router.top_k=2", "checkpoint.resume=auto", "checkpoint.interval=2"]
    ep = ["train.micro_batch_size=2", "moe.expert_parallel_size=2"]
    torchrun(2, tmp_path / "full", data_cache, *ep, *args)
    torchrun(2, tmp_path / "split", data_cache, *ep, *args, "train.stop_at_step=2")
    proc = torchrun(2, tmp_path / "split", data_cache, *ep, *args)
    assert "resumed from" in proc.stdout

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r}

    full = losses("full")
    assert sorted(full) == list(range(1, STEPS + 1)) and losses("split") == full  # exact, every step
    torchrun(2, tmp_path / "moved", data_cache, *ep, *args, "train.stop_at_step=2")
    single(tmp_path / "moved", data_cache, 4, *args)
    moved = losses("moved")
    assert sorted(moved) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert moved[step] == pytest.approx(full[step], rel=2e-2), (step, moved[step], full[step])
