"""ZeRO-1/2 on one process run DeepSpeed's stage-0 path (``train.zero_on_one_process`` false, the default):
one data-parallel rank owns every partition, so the update is the same without ZeRO's flat fp32 copy and
per-step gradient flattening. The trainer, the planner and checkpoints must agree on it."""

import pytest
from conftest import REPO, read_metrics, train_ok

from moetrain.config import load_config
from moetrain.config.deepspeed import partitions_nothing
from moetrain.planning.estimate import Assumptions, Layout, estimate
from moetrain.planning.model_size import model_size

pytestmark = pytest.mark.timeout(300)

ZERO1 = ["deepspeed.zero_optimization.stage=1", "train.steps=6"]
KEEP = "train.zero_on_one_process=true"


def _rows(run):
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def test_the_rule():
    def rule(stage=1, world=1, offload=False, keep=False, precision="fp32", accum=None):
        return partitions_nothing(stage, world, offload, keep, precision, accum)

    assert rule() and rule(stage=2) and rule(accum="fp32") and rule(precision="bf16")
    assert rule(precision="bf16", accum="bf16")
    assert not rule(world=2)  # two ranks: real partitions
    assert not rule(offload=True)  # offload needs ZeRO's CPU Adam
    assert not rule(keep=True)  # asked to keep ZeRO
    assert not rule(stage=3) and not rule(stage=0)  # ZeRO-3 is its own path; stage 0 already is
    assert not rule(accum="bf16") and not rule(precision="bf16", accum="fp32")  # stage 0 refuses the mix


@pytest.mark.parametrize(
    "precision, wrapper, rel, norm_rel",
    [("fp32", "AdamW", 1e-5, 1e-5), ("bf16", "FP16_UnfusedOptimizer", 1e-3, 5e-3)],
)
def test_zero1_on_one_process_is_the_stage0_update(tmp_path, data_cache, precision, wrapper, rel, norm_rel):
    """The same losses and gradient norms as DeepSpeed's ZeRO-1 machinery, through the stage-0 optimizer
    (fp32: the flat and the per-parameter Adam round alike, the norms are summed in another order; bf16:
    both keep fp32 masters of bf16 weights, and their norms of bf16 gradients differ in rounding: 1.1e-3 at
    one thread, so 5e-3 on the norms, under the 1.2-2.9 % the bf16 pair drifted apart at steps 3-6 before
    unfused_bf16.undo_unfused_init_step; losses drifted 0.15 %)."""
    args = [*ZERO1, f"train.precision={precision}"]
    fast = train_ok(tmp_path / "fast", data_cache, *args)
    kept = train_ok(tmp_path / "kept", data_cache, *args, KEEP)
    assert f"inside DeepSpeed's {wrapper} " in fast.stdout and "ZeRO stage 1 run as stage 0" in fast.stdout
    assert "inside DeepSpeed's DeepSpeedZeroOptimizer " in kept.stdout and "run as stage 0" not in kept.stdout
    a, b = _rows(tmp_path / "fast"), _rows(tmp_path / "kept")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=rel), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=norm_rel), step


def test_a_checkpoint_crosses_between_the_two_paths(tmp_path, data_cache):
    """Saved on the stage-0 path, resumed under ZeRO-1's machinery (and the other way): the resumed steps
    equal the uninterrupted run's, as any change of ZeRO stage does (checkpoints are layout-free)."""
    full = tmp_path / "full"
    train_ok(full, data_cache, *ZERO1)
    for name, first, second in (("to_zero", [], [KEEP]), ("from_zero", [KEEP], [])):
        run = tmp_path / name
        train_ok(run, data_cache, *ZERO1, *first, "train.stop_at_step=3")
        proc = train_ok(run, data_cache, *ZERO1, *second)
        assert "resumed from" in proc.stdout
        a, b = _rows(run), _rows(full)
        assert sorted(a) == sorted(b)
        for step in a:
            assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), (name, step)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_planner_estimates_what_runs(precision):
    """World 1: ZeRO-1/2 are estimated as stage 0, unless ZeRO is kept; at two ranks they stay ZeRO."""
    states = {}
    for keep in (False, True):
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.vocab_size=257", f"train.precision={precision}",
                                                            f"train.zero_on_one_process={str(keep).lower()}"])  # fmt: skip
        size = model_size(cfg.model, cfg.moe)
        for world, zero in ((1, 0), (1, 1), (1, 2), (2, 0), (2, 1)):
            layout = Layout(world, world, 1, zero, "none", False, 8, 1)
            states[keep, world, zero] = estimate(cfg, size, layout, Assumptions(overhead=0)).states
    assert states[False, 1, 1] == states[False, 1, 2] == states[False, 1, 0] != states[True, 1, 1]
    if precision == "fp32":  # ZeRO keeps an fp32 copy of fp32 weights; stage 0 steps the weights themselves
        assert states[True, 1, 1].optimizer > states[False, 1, 1].optimizer
    assert states[False, 2, 1] == states[True, 2, 1] != states[False, 2, 0]
