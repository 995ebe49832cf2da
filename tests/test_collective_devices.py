"""Every tensor handed to torch.distributed during training, checkpointing, resuming and evaluation is on
the communication device, never one a GPU run would keep on the host (NCCL rejects those).

On the CPU, gloo accepts anything; ``tests/placement.py`` marks the tensors a GPU run would hold on the
host (built without a device, or moved with ``.cpu()``) and records every collective's tensors. The run
covers a fully skipped logging interval (a NaN step under ``train.nonfinite: skip``, where the metrics
reduction had to build its own zeros), checkpoints (their non-finite check), evaluation, and a resume in
another layout.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY, TINY_CONFIG, clean_env

from moetrain.parallel.collectives import comm_device

ENTRY = REPO / "tests" / "placement.py"


def _torchrun(run, data_cache, env=None, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ENTRY)]
    cmd += ["train", str(TINY_CONFIG), *TINY, f"data.cache_dir={data_cache}", f"run_dir={run}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(**(env or {})), cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [r for rank in (0, 1) for r in json.loads((run / f"placement_rank{rank}.json").read_text())]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_no_collective_gets_a_tensor_a_gpu_run_would_keep_on_the_host(tmp_path, data_cache):
    run = tmp_path / "run"
    common = ["train.nonfinite=skip", "checkpoint.interval=2", "train.eval_interval=2", "logging.interval=1"]
    first = _torchrun(run, data_cache, {"MOETRAIN_FAULT": "nan_loss@2"}, "train.steps=4", *common)
    resumed = _torchrun(run, data_cache, None, "train.steps=6", "moe.expert_parallel_size=2", *common)
    for records in (first, resumed):
        sites = {r["at"].split(":")[0] for r in records}
        assert any("moetrain/training/callbacks.py" in s or "moetrain/parallel/collectives.py" in s for s in sites)
        assert any(r["op"] == "all_to_all_single" for r in records) or records is first  # EP exchanges
        host = sorted({f"{r['op']} at {r['at']}" for r in records if r["host"]})
        assert host == [], "tensors a GPU run keeps on the host reached a collective:\n" + "\n".join(host)


def test_the_marks_follow_where_code_puts_a_tensor():
    """The instrument itself: built without a device or moved with .cpu() is marked; an explicit device
    clears the mark; the mark follows the data through ops."""
    import torch
    from placement import HostPlacement, HostTensor

    with HostPlacement():
        bare = torch.zeros(2)
        placed = torch.zeros(2, device="cpu")
        moved = bare.to(comm_device())
        flag = (placed + 1).sum().cpu()
        derived = torch.stack([bare, placed]) * 2
    assert isinstance(bare, HostTensor) and isinstance(flag, HostTensor) and isinstance(derived, HostTensor)
    assert not isinstance(placed, HostTensor) and not isinstance(moved, HostTensor)


@pytest.mark.timeout(400)
def test_forced_collectives_run_every_path_alone_and_change_nothing(tmp_path, data_cache):
    """MOETRAIN_FORCE_COLLECTIVES=1 (the one-GPU check's NCCL step): one process runs the all-to-all
    dispatcher over a group of one and every collective of training and checkpointing, with no tensor from
    the host, and trains exactly as without it."""
    from conftest import read_metrics

    runs = {}
    for name, env in (("plain", {}), ("forced", {"MOETRAIN_FORCE_COLLECTIVES": "1"})):
        run = tmp_path / name
        cmd = [sys.executable, str(ENTRY), "train", str(TINY_CONFIG), *TINY, f"data.cache_dir={data_cache}"]
        cmd += [f"run_dir={run}", "train.steps=3", "checkpoint.interval=2", "moe.router={kind: topk, top_k: 2}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(**env), cwd=REPO, timeout=380)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = (json.loads((run / "placement_rank0.json").read_text()), read_metrics(run))

    def ours(records):  # the collectives moetrain itself issues (DeepSpeed's engine broadcasts even alone)
        return [r for r in records if "moetrain/" in r["at"]]

    assert ours(runs["plain"][0]) == []  # alone, moetrain issues no collective
    forced = runs["forced"][0]
    assert {"all_to_all_single", "all_reduce"} <= {r["op"] for r in ours(forced)}
    assert not [r for r in forced if r["host"]]
    losses = [[r["loss"] for r in metrics if "loss" in r] for _, metrics in runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 3
