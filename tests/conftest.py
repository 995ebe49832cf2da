"""Shared test setup: CPU-first, tiny models, real processes.

- Triton kernels run in the interpreter on machines without CUDA (set before triton is imported).
- ``gpu`` tests skip without CUDA; ``slurm`` tests skip only where SLURM cannot be installed.
- ``run_cli`` runs ``moetrain`` as a real subprocess; ``TINY`` holds overrides for a seconds-long run.
- The suite runs as 2 pytest-xdist workers (README): one intra-op thread per process under a worker, and
  the ``slurm`` tests in one worker (``--dist loadgroup``), since they share this machine's SLURM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # NOTE: the suite runs as 2 pytest-xdist workers on 2 cores (README): one intra-op thread per process,
    # set before torch is imported here and inherited by every process a test starts, so that two workers'
    # processes do not spin on each other's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from moetrain.parallel.layout import LAUNCHER_VARS, free_port  # noqa: E402, F401 - after the variables above

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# A 2-block d=32 model on a small slice of the built-in corpus: a few seconds per run on CPU.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=32",
    "moe.num_experts=4",
    "moe.expert_hidden=32",
    "data.seq_len=32",
    "data.max_tokens=200000",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
    "logging.interval=1",
    "optim.warmup_steps=2",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slurm: starts a real one-node SLURM (skipped where it cannot be installed)")
    config.addinivalue_line("markers", "multiproc: starts several real processes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slurm" in item.keywords:  # one SLURM on this machine: its tests run one after another, in one worker
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One token cache for the whole session (the built-in corpus, tokenized once)."""
    return str(tmp_path_factory.mktemp("data_cache"))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a launcher's rank variables (a child starts its own job)."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, **extra}


FAULTS_ENTRY = REPO / "tests" / "faults.py"


def cli_entry(env: dict | None) -> list[str]:
    """How to start moetrain: ``-m moetrain.cli``, or the failpoint entry when ``env`` sets
    ``MOETRAIN_FAULT`` (tests/faults.py installs the failpoints as a training callback)."""
    return [str(FAULTS_ENTRY)] if "MOETRAIN_FAULT" in (env or {}) else ["-m", "moetrain.cli"]


def run_cli(
    *args: str, env: dict | None = None, timeout: int = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m moetrain.cli ARGS`` as a real process; returns the completed process (text output)."""
    full_env = clean_env(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, *cli_entry(env), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or REPO,
    )


def run_train(
    run_dir: Path, data_cache: str, *overrides: str, nproc: int = 1, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``moetrain train configs/tiny.yaml`` with the TINY overrides, as one process or under
    ``torchrun --standalone --nproc-per-node N``; returns the completed process."""
    args = ["train", str(TINY_CONFIG), *TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", *overrides]
    if nproc == 1:
        return run_cli(*args, env=env, timeout=timeout)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [*head, *cli_entry(env), *args], capture_output=True, text=True, env=clean_env(PYTHONUNBUFFERED="1", **(env or {})),
        timeout=timeout, cwd=REPO,
    )  # fmt: skip


def train_ok(
    run_dir: Path, data_cache: str, *overrides: str, expect: int = 0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``run_train`` on one process, asserting its exit code (with the output's tail on failure)."""
    proc = run_train(run_dir, data_cache, *overrides, env=env)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_bench_quick(script: Path, out: Path, data_cache: str, *args: str) -> dict:
    """A ``bench/`` script's quick run, one shape and one repetition of a few steps on the session's token
    store, as a real process; returns the JSON it wrote (asserting the exit code, with the output's tail)."""
    import json

    cmd = [
        sys.executable, str(script), "--quick", "--steps", "4", "--warmup", "1", *args,
        "--override", f"data.cache_dir={data_cache}", "data.max_tokens=200000",  # conftest.TINY's corpus size
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())
