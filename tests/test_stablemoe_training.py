"""StableMoE inside the DeepSpeed engine, in real processes: the stage switch freezes the routing and
the distilled router bit for bit (ZeRO 0, 1 and 2, one and two ranks), E keeps learning, and a run
resumed across the switch equals the uninterrupted run."""

import hashlib
import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY, TINY_CONFIG, clean_env, free_port, read_metrics, run_cli

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

STEPS, STAGE1 = 8, 3
COMMON = [
    *TINY,
    f"train.steps={STEPS}",
    f"moe.router.stage1_steps={STAGE1}",
    "moe.fluctuation.interval=1",
    "moe.fluctuation.blocks=4",
    "optim.weight_decay=0.1",
]

# Runs a Trainer with a recording callback (public API only) and dumps one row per optimizer step.
RECORDER = r"""
import hashlib, json, sys
import torch
from moetrain.training.callbacks import Callback
from moetrain.commands.train import _prepare_process_env
from moetrain.config import load_config
from moetrain.moe.routers.stablemoe import StableMoERouter
from moetrain.parallel.layout import ParallelLayout
from moetrain.training.trainer import Trainer

def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()

class Recorder(Callback):
    def on_train_start(self, trainer):
        self.rows, self.e_grad = [], 0.0
        self.router = next(m for m in trainer.model.modules() if isinstance(m, StableMoERouter))
        def hook(g):
            self.e_grad += float(g.float().norm())
        self.router.centroids_ED.register_hook(hook)

    def on_step_end(self, trainer, result):
        r = self.router
        self.rows.append({"step": result.step, "stage": int(r.stage), "e_grad": self.e_grad,
                          "distilled": digest(*r.distilled_parameters()), "centroids": digest(r.centroids_ED),
                          "requires_grad": [p.requires_grad for p in r.distilled_parameters()],
                          "group_lrs": {g["name"]: g["lr"] for g in trainer.engine.lr_scheduler.optimizer.param_groups}})
        self.e_grad = 0.0

cfg = load_config(sys.argv[1], sys.argv[3:])
_prepare_process_env()
layout = ParallelLayout.init(1)
rec = Recorder()
trainer = Trainer(cfg, layout, [rec])
trainer.setup()
trainer.train()
if layout.rank == 0:
    json.dump(rec.rows, open(sys.argv[2], "w"))
"""


def record(tmp_path, data_cache, nproc, *overrides):
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "rows.json"
    env = clean_env()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if nproc == 1:
        launcher, env["MASTER_PORT"] = [sys.executable], str(free_port())
    cmd = [
        *launcher,
        str(script),
        str(TINY_CONFIG),
        str(out),
        *COMMON,
        f"data.cache_dir={data_cache}",
        f"run_dir={tmp_path / 'run'}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), read_metrics(tmp_path / "run")


@pytest.mark.parametrize(
    "zero,nproc,precision",
    [(0, 1, "fp32"), (1, 1, "fp32"), (2, 1, "fp32"), (0, 2, "fp32"), (2, 2, "fp32"), (0, 1, "bf16")],
)
def test_after_the_switch_routing_and_distilled_router_are_frozen(tmp_path, data_cache, zero, nproc, precision):
    # ZeRO's flat partitions even on one process (which by default runs ZeRO-1/2 as stage 0)
    keep = f"train.zero_on_one_process={str(zero > 0).lower()}"
    rows, metrics = record(
        tmp_path, data_cache, nproc, f"deepspeed.zero_optimization.stage={zero}", f"train.precision={precision}", keep
    )
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    stage1, stage2 = rows[:STAGE1], rows[STAGE1:]
    # the switch happens before update STAGE1 + 1 (on_step_start of 0-based step STAGE1)
    assert [r["stage"] for r in rows] == [0] * STAGE1 + [1] * (STEPS - STAGE1)
    assert len({r["distilled"] for r in stage1}) == STAGE1  # it learns in stage 1 ...
    assert {r["distilled"] for r in stage2} == {rows[STAGE1 - 1]["distilled"]}  # ... then never moves a bit
    assert all(r["requires_grad"] == [False, False] for r in stage2)
    assert all(lr == 0.0 for r in stage2 for name, lr in r["group_lrs"].items() if name.startswith("distilled"))
    assert all(lr > 0.0 for r in stage1 for name, lr in r["group_lrs"].items())
    assert all(r["e_grad"] > 0 for r in stage2)  # E still receives gradients through the gate
    assert len({r["centroids"] for r in stage2}) == len(stage2)
    fluct = {r["step"]: r["moe/layer0/fluctuation"] for r in metrics if "moe/layer0/fluctuation" in r}
    assert sorted(fluct) == list(range(1, STEPS + 1))
    assert all(fluct[s] == 0.0 for s in range(STAGE1 + 1, STEPS + 1))  # exactly 0 after the switch
    report = json.loads((tmp_path / "run" / "fluctuation.json").read_text())
    assert report["layers"][0]["last_change_after"]["0.5"] == 0.0  # nothing changes after step 3 of 8
    assert {"moe/router_stage": 1} == {
        k: v for r in metrics if r["step"] == STAGE1 for k, v in r.items() if k == "moe/router_stage"
    }


def train(run_dir, data_cache, *overrides):
    proc = run_cli("train", str(TINY_CONFIG), *COMMON, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def by_step(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.mark.parametrize("zero", [0, 2])
def test_resume_across_the_switch_equals_uninterrupted(tmp_path, data_cache, zero):
    # ZeRO-2's own machinery on one process (which by default runs it as stage 0)
    ds = (f"deepspeed.zero_optimization.stage={zero}", f"train.zero_on_one_process={str(zero > 0).lower()}")
    full = tmp_path / "full"
    train(full, data_cache, *ds)
    for stop in (2, 5):  # stopped in stage 1 (resume crosses the switch) and in stage 2 (stage restored)
        split = tmp_path / f"split{stop}"
        train(split, data_cache, *ds, f"train.stop_at_step={stop}")
        assert "resumed from" in train(split, data_cache, *ds).stdout
        assert by_step(split, "loss") == by_step(full, "loss")  # exact, every step
        assert by_step(split, "moe/layer0/fluctuation") == by_step(full, "moe/layer0/fluctuation")
        assert (split / "fluctuation.json").read_text() == (full / "fluctuation.json").read_text()
        final = [name / "checkpoints" / f"step_{STEPS:06d}" for name in (full, split)]
        assert _module_digest(final[0]) == _module_digest(final[1])


def _module_digest(folder):
    from moetrain.checkpoint import consolidated_state_dict

    module = consolidated_state_dict(folder)
    h = hashlib.sha256()
    for name in sorted(module):
        h.update(name.encode() + module[name].float().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("ep", [1, 2], ids=["dp2", "ep2"])
def test_two_ranks_equal_one_process_on_the_global_micro_batch(tmp_path, data_cache, ep):
    """Data parallelism (and expert parallelism) over 2 ranks equals one process that sees the global
    micro-batch, across the switch: the balance loss counts tokens over every rank."""
    args = [
        *COMMON,
        "train.steps=5",
        "moe.router.stage1_steps=2",
        "optim.lr=1e-2",
        "moe.num_experts=4",
        f"data.cache_dir={data_cache}",
        "checkpoint.resume=none",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli("train", str(TINY_CONFIG), *args, f"run_dir={one}", "train.micro_batch_size=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = clean_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "moetrain.cli",
        "train",
        str(TINY_CONFIG),
        *args,
        f"run_dir={two}",
        "train.micro_batch_size=4",
        f"moe.expert_parallel_size={ep}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    keys = ("loss", "aux_loss", "moe/layer0/load_balance", "moe/layer0/distill")
    for key in keys:
        a, b = by_step(one, key), by_step(two, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
        assert all(a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-7) for s in a), (key, a, b)
    assert by_step(one, "aux_loss")[1] > 0 and by_step(one, "aux_loss")[5] == 0  # stage 1, then stage 2
