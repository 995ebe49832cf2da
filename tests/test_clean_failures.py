"""Clean failures through the real CLI: bad input exits 2 with one message and writes nothing; a stuck
rank ends the job after train.collective_timeout_s; a resumed run logs each step once."""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAULTS_ENTRY, REPO, TINY, TINY_CONFIG, clean_env, read_metrics, run_cli

pytestmark = pytest.mark.timeout(300)

DENSE_CONFIG = REPO / "configs" / "paper" / "cpu" / "lm_dense.yaml"


def train(run_dir, data_cache, *overrides, expect=0, config=TINY_CONFIG):
    proc = run_cli("train", str(config), *TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", *overrides)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_refused(proc, *texts):
    """Exit 2, one ``error:`` message holding every text, no traceback."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in texts:
        assert text in proc.stderr, proc.stderr


def test_config_file_that_is_not_utf8(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_bytes(b"name: caf\xe9\n")  # latin-1, as an editor on another system might save it
    run = tmp_path / "run"
    proc = run_cli("train", str(config), f"run_dir={run}")
    assert_refused(proc, f"config file '{config}' is not UTF-8 text (byte 9 is 0xe9)")
    assert not run.exists()


@pytest.mark.parametrize(
    "fmt,name,content",
    [
        ("text", "notes.txt", b"plain text " * 20 + b"caf\xe9 au lait\n"),
        ("jsonl", "rows.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'),
    ],
    ids=["text", "jsonl"],
)
def test_data_file_that_is_not_utf8(tmp_path, fmt, name, content):
    """Refused before anything is written: no token cache, no run dir."""
    good = tmp_path / "data" / f"good{os.path.splitext(name)[1]}"
    good.parent.mkdir()
    good.write_text('{"text": "fine"}\n' if fmt == "jsonl" else "fine text\n")
    bad = tmp_path / "data" / name
    bad.write_bytes(content)
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = train(run, cache, f"data.paths=[{good.parent}]", f"data.format={fmt}", expect=2)
    assert_refused(proc, f"data file '{bad}' is not UTF-8 text: byte {content.index(0xE9)} is 0xe9")
    assert not run.exists() and not cache.exists()


@pytest.mark.parametrize("where", ["parent_is_a_file", "run_dir_is_a_file"])
def test_unwritable_run_dir_is_refused_first(tmp_path, where):
    """Checked before data preparation (the token cache folder never appears) and nothing is written.

    Tests run as root, which chmod does not stop: a regular file where a folder must be is what fails."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    run = blocker / "run" if where == "parent_is_a_file" else blocker
    cache = tmp_path / "cache"
    proc = train(run, cache, expect=2)
    why = f"'{blocker}' is a file, not a folder" if where == "parent_is_a_file" else "it is a file, not a folder"
    assert_refused(proc, f"run_dir '{run}' is not writable: {why}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    assert blocker.read_text() == "a file, not a folder\n"


def test_override_into_a_null_section_is_refused(tmp_path):
    """``moe: null`` in the file + ``moe.fluctuation.interval=0`` used to build a default MoE silently."""
    run = tmp_path / "run"
    proc = run_cli("train", str(DENSE_CONFIG), "moe.fluctuation.interval=0", f"run_dir={run}")
    assert_refused(
        proc,
        "override 'moe.fluctuation.interval=0' changes a key of 'moe'",
        f"config file '{DENSE_CONFIG}' sets moe to null",
    )
    assert not run.exists()
    fix = re.search(r"'(moe=\{.+?\})'", proc.stderr).group(1)
    assert fix == "moe={fluctuation: {interval: 0}}"
    for override in (fix, "moe={num_experts: 4}", "moe={}"):  # the whole section: still accepted
        proc = run_cli("validate", str(DENSE_CONFIG), override)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_enabled_without_wandb_installed(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", str(TINY_CONFIG), "logging.wandb.enabled=true", f"run_dir={run}")
    assert_refused(
        proc, "logging.wandb: enabled is true but the wandb package is not installed", 'pip install -e ".[wandb]"'
    )
    assert not run.exists()


def test_resumed_run_logs_each_step_once(tmp_path, data_cache):
    """Steps 3-4 are logged, then their checkpoint is lost: the rerun resumes at 2 and logs 3-6 again."""
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=6", "train.stop_at_step=4", "checkpoint.interval=2")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    shutil.rmtree(run / "checkpoints" / "step_000004")
    proc = train(run, data_cache, "train.steps=6", "checkpoint.interval=2")
    assert "at step 2" in proc.stdout and "dropped" in proc.stdout
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 6]  # the first run's step-0 eval is kept
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)  # nothing of the first run's steps 3-4 is left after the rerun's


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_stuck_rank_ends_the_job_after_the_collective_timeout(tmp_path, data_cache):
    """Rank 1 stops answering at step 3; rank 0's gradient all-reduce gives up after 10 s, torchrun ends."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(FAULTS_ENTRY)),
        *("train", str(TINY_CONFIG), *TINY, f"data.cache_dir={data_cache}", f"run_dir={tmp_path / 'run'}"),
        *("train.steps=6", "train.collective_timeout_s=10"),
    ]
    env = clean_env(MOETRAIN_FAULT="hang@3:rank1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        out, _ = proc.communicate()
        pytest.fail("the job was still running after 150 s: the collective timeout did not end it\n" + out[-4000:])
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, out[-4000:]
    assert "fault injected: hang at step 3 on rank 1" in out
    assert re.search(r"(?i)tim(ed|ing) out", out), out[-4000:]  # gloo: "Timed out waiting 10000ms for recv"
    assert elapsed < 120, f"took {elapsed:.0f} s"
