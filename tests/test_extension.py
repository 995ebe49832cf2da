"""moetrain is extended from outside the package: a router written in a test module trains through the
CLI, with a between-steps hook it declares, and nothing under ``moetrain/training/`` names it."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO, TINY, TINY_CONFIG, clean_env, read_metrics
from safetensors import safe_open

PLUGIN = REPO / "tests" / "plugins" / "shift_router.py"


def _train(run, data_cache, *overrides):
    cmd = [sys.executable, str(PLUGIN), "train", str(TINY_CONFIG), *TINY, f"data.cache_dir={data_cache}"]
    cmd += [f"run_dir={run}", "moe.router={kind: shift, stride: 2}", "train.steps=3", "checkpoint.interval=1"]
    proc = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
def test_a_router_from_outside_trains_through_the_cli_with_its_hook(tmp_path, data_cache):
    run = tmp_path / "run"
    _train(run, data_cache, "train.stop_at_step=2")
    _train(run, data_cache)  # resumed: the hook's state comes back from the checkpoint
    shifts = {r["step"]: r["shift"] for r in read_metrics(run) if "shift" in r}
    assert shifts == {1: 2, 2: 4, 3: 6}  # after every optimizer step, once, across the resume
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    with safe_open(str(run / "checkpoints" / "step_000003" / "shared.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k.endswith("router.shift")}
    assert saved and all(int(v) == 6 for v in saved.values())
    assert "shift" in (run / "config.yaml").read_text()


def test_the_training_package_imports_no_router():
    """The loop reaches routing only through the hooks the model declares (``moetrain.moe.hooks``)."""
    found = []
    for path in sorted((REPO / "moetrain" / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            found += [
                f"{path.name}: {m}" for m in mods if m.startswith(("moetrain.moe.routers", "moetrain.moe.fluctuation"))
            ]
    assert found == []
