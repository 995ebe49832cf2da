"""Upcycled models under expert parallelism and fine-tuned through the CLI (docs/finetuning.md).

- step 0 of sparse, granular and BTX upcycling, loaded under EP 2 (2 gloo processes, each reading only its
  experts from the step-0 checkpoint), gives the dense transformers model's logits within 1e-5;
- the worked example (scripts/make_tiny_dense.py, ``moetrain upcycle``, configs/finetune_upcycle_tiny.yaml)
  fine-tuned a few steps on tests/data/chat_small.jsonl lowers the masked validation loss, and one process
  and 2 processes under EP 2 give the same losses (1e-5).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, clean_env, read_metrics, run_cli
from distributed import run_distributed
from hf_dense import dense_folder
from hf_runs import VOCAB

from moetrain.cli import main

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

METHODS = {  # every method with experts that split over 2 ranks
    "sparse": ["--method", "sparse", "--num-experts", "4", "--top-k", "2"],
    "granular": ["--method", "granular", "--num-experts", "4", "--top-k", "2", "--granularity", "2"],
    "btx": ["--method", "btx", "--top-k", "1"],
}


def _ep_step_0_is_dense(rank: int, world: int, src: str, runs: list[str]) -> None:
    import transformers

    from moetrain.config import load_config
    from moetrain.model import MoETransformer
    from moetrain.parallel.layout import ParallelLayout
    from moetrain.parallel.parallelize import parallelize
    from moetrain.training.checkpoint import read_local_state

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    for run in runs:
        cfg = load_config(f"{run}/config.yaml", ["moe.expert_parallel_size=2"])
        layout = ParallelLayout(rank, world, rank, 2, dist.group.WORLD)
        model = parallelize(MoETransformer(cfg.model, cfg.moe), layout).eval()
        local = read_local_state(model, Path(run) / "checkpoints" / "step_000000")
        half = cfg.moe.num_experts // 2
        assert {k.rsplit("/", 1)[1] for k in local.expert_keys_read} == {str(rank * half + i) for i in range(half)}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(local.tensors[name]["value"])
            difference = (hf(x).logits - model(x).logits).abs().max().item()
        assert difference <= 1e-5, (run, difference)


def test_step_0_under_ep_2_is_the_dense_model(tmp_path):
    src = tmp_path / "dense"
    dense_folder(src, "llama")
    runs = []
    for method, flags in METHODS.items():
        n = 2 if method == "btx" else 1
        assert main(["upcycle", *[str(src)] * n, str(tmp_path / method), *flags]) == 0
        runs.append(str(tmp_path / method))
    run_distributed(_ep_step_0_is_dense, 2, str(src), runs)


STEPS = 6
FINETUNE = [f"train.steps={STEPS}", "train.eval_interval=3", "checkpoint.interval=0", "logging.interval=1",
            "optim.warmup_steps=2", "optim.eps=1e-6", "data.num_workers=0"]  # fmt: skip


def finetune(upcycled: Path, run: Path, *overrides: str, nproc: int = 1) -> dict[str, dict[int, float]]:
    """configs/finetune_upcycle_tiny.yaml on a copy of ``upcycled``; returns {"loss"|"val_loss": {step: value}}."""
    subprocess.run(["cp", "-r", str(upcycled), str(run)], check=True)
    paths = [f"run_dir={run}", f"data.tokenizer={run / 'tokenizer'}", f"data.cache_dir={upcycled.parent / 'cache'}"]
    args = ["train", str(REPO / "configs" / "finetune_upcycle_tiny.yaml"), *paths, *FINETUNE, *overrides]
    if nproc == 1:
        proc = run_cli(*args, timeout=400)
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
        proc = subprocess.run([*head, "moetrain.cli", *args], capture_output=True, text=True, env=clean_env(),
                              cwd=REPO, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holds weights only" in proc.stdout
    metrics = read_metrics(run)
    return {key: {r["step"]: r[key] for r in metrics if key in r} for key in ("loss", "val_loss")}


def test_the_worked_example_fine_tunes_on_chat_data_alike_on_one_process_and_under_ep_2(tmp_path):
    dense, upcycled = tmp_path / "dense_tiny", tmp_path / "upcycle_tiny"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_dense.py"), str(dense)],
                          capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    assert main(["upcycle", str(dense), str(upcycled), "--method", "sparse", "--num-experts", "8", "--top-k", "2"]) == 0
    one = finetune(upcycled, tmp_path / "one", "train.micro_batch_size=8")
    ep = finetune(upcycled, tmp_path / "ep", "train.micro_batch_size=4", "moe.expert_parallel_size=2", nproc=2)
    for key in ("loss", "val_loss"):
        assert sorted(one[key]) == sorted(ep[key]) and len(one[key]) >= 3, key
        for step, value in one[key].items():
            assert abs(ep[key][step] - value) <= 1e-5 * abs(value), (key, step, value, ep[key][step])
    val = one["val_loss"]
    assert val[STEPS] < val[3] < val[0], val


def test_stablemoe_routing_starts_from_an_upcycled_model_and_switches(tmp_path):
    """``moe.router={kind: stablemoe, ...}`` at upcycle time: a fresh StableMoE router over the copies (its
    sigmoid gate makes step 0 differ from the dense model); stage 2 starts at stage1_steps."""
    dense, upcycled = tmp_path / "dense_tiny", tmp_path / "upcycle_tiny"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_dense.py"), str(dense)],
                          capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    router = "moe.router={kind: stablemoe, stage1_steps: 2}"
    assert main(["upcycle", str(dense), str(upcycled), "--method", "sparse", "--num-experts", "4", "--top-k", "1",
                 router]) == 0  # fmt: skip
    stable = ["moe.router={kind: stablemoe, stage1_steps: 2}", "moe.layers=[0, 1]", "moe.num_experts=4"]
    finetune(upcycled, tmp_path / "run", "train.micro_batch_size=8", *stable)
    switched = [r for r in read_metrics(tmp_path / "run") if "moe/switch_step" in r]
    assert switched and switched[0]["moe/switch_step"] == 2
