"""Training an imported model: the step-0 checkpoint under every layout, and the way back out.

- ``moetrain train RUN_DIR/config.yaml`` of an import trained 10 steps under ``torchrun`` with 2 ranks
  and ``moe.expert_parallel_size=2`` (ZeRO-1, 2 and 3) gives the single-process losses within 1e-5
  (relative); stopped at step 5 under (2 ranks, EP 2, ZeRO-2) and resumed on one process (EP 1, ZeRO-0),
  it gives them too (the tolerance and reference as tests/test_expert_parallel.py's);
- on each rank of an expert-parallel job the load reads only the experts that rank holds;
- the trained model exports as the family's own class, which transformers loads natively and whose logits
  equal moetrain's within 1e-4; a DeepSeek-V3 checkpoint's multi-token-prediction layers come back with the
  untrained import's export and are declared absent in a trained one's;
- a job whose model differs from the import's is refused, naming the field; training-only model fields
  (the load-balance loss) may change, and the data, batch and layout are the job's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, clean_env, read_metrics, run_cli
from distributed import run_distributed
from hf_runs import VOCAB, corpus, hf_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moetrain.cli import main
from moetrain.inference.loading import load_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]

STEPS = 10
TRAINING = [  # import-time overrides: the training settings of config.yaml
    f"train.steps={STEPS}", "train.eval_interval=0", "train.eval_batches=1", "logging.interval=1",
    "data.seq_len=32", "data.num_workers=0", "optim.lr=1e-2", "optim.eps=1e-6", "optim.warmup_steps=2",
    "moe.router.load_balance_coeff=0.01",
]  # fmt: skip


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Qwen2-MoE (8 experts, top 2, a gated shared expert, a dense block), imported with training overrides."""
    root = tmp_path_factory.mktemp("imported")
    (root / "corpus.txt").write_text(corpus(words=8000, seed=3))
    hf_folder("qwen2_moe-mlp_only", root / "src")
    data = [f"data.paths=[{root / 'corpus.txt'}]", f"data.cache_dir={root / 'cache'}"]
    assert main(["import", str(root / "src"), str(root / "base"), *TRAINING, *data]) == 0
    return root


def copy_run(imported, name: str):
    """A copy of the imported run directory (its config.yaml names the original: run_dir= at train time)."""
    run = imported.parent / f"{imported.name}-{name}"
    shutil.copytree(imported / "base", run)
    return run


def train(run, *overrides, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    args = ["train", str(run / "config.yaml"), f"run_dir={run}", *overrides]
    if nproc == 1:
        proc = run_cli(*args, timeout=timeout)
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
        proc = subprocess.run([*head, "moetrain.cli", *args], capture_output=True, text=True, env=clean_env(),
                              cwd=REPO, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def single(imported):
    """The reference: one process, the global batch (4) in one micro-batch."""
    run = copy_run(imported, "single")
    proc = train(run, "train.micro_batch_size=4")
    assert "holds weights only" in proc.stdout and "resumed from" in proc.stdout
    return run


EP = ["train.micro_batch_size=2", "moe.expert_parallel_size=2"]


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_an_import_trained_under_ep_2_gives_the_single_process_losses(imported, single, zero):
    run = copy_run(imported, f"ep-zero{zero}")
    train(run, *EP, f"deepspeed.zero_optimization.stage={zero}", nproc=2)
    one, ep = losses(single), losses(run)
    assert sorted(one) == sorted(ep) == list(range(1, STEPS + 1))
    for step in one:
        assert ep[step] == pytest.approx(one[step], rel=1e-5), (step, ep[step], one[step])
    assert one[STEPS] < one[1]  # it trains


def test_an_import_stopped_under_ep_resumes_in_another_layout(imported, single):
    run = copy_run(imported, "resumed")
    train(run, *EP, "deepspeed.zero_optimization.stage=2", "train.stop_at_step=5", "checkpoint.interval=5", nproc=2)
    # 1 process, EP 1, ZeRO-0, from step_000005 (config.yaml now holds the first job's settings: override them)
    layout = ["moe.expert_parallel_size=1", "deepspeed.zero_optimization.stage=0", "train.stop_at_step=null"]
    proc = train(run, "train.micro_batch_size=4", *layout)
    assert f"resumed from {run / 'checkpoints' / 'step_000005'}" in proc.stdout
    one, resumed = losses(single), losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in one:
        assert resumed[step] == pytest.approx(one[step], rel=1e-5), (step, resumed[step], one[step])


def test_the_trained_import_exports_as_its_own_class(imported, single, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("export", str(single), str(out))
    assert proc.returncode == 0 and "Qwen2MoeForCausalLM" in proc.stdout, proc.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and not (out / "modeling_moetrain.py").exists()
    loaded = load_checkpoint(single)
    assert loaded.step == STEPS
    x = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = model(x).logits, loaded.model(x).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    # trained: the weights moved away from the source's
    source = transformers.AutoModelForCausalLM.from_pretrained(imported / "src")
    assert not torch.equal(source.model.embed_tokens.weight, model.model.embed_tokens.weight)


def _reads_own_experts(rank: int, world: int, run: str) -> None:
    from moetrain.config import load_config
    from moetrain.model import MoETransformer
    from moetrain.parallel.layout import ParallelLayout
    from moetrain.parallel.parallelize import parallelize
    from moetrain.training.checkpoint import read_local_state

    cfg = load_config(f"{run}/config.yaml", ["moe.expert_parallel_size=2"])
    model = parallelize(MoETransformer(cfg.model, cfg.moe), ParallelLayout(rank, world, rank, 2, dist.group.WORLD))
    local = read_local_state(model, Path(run) / "checkpoints" / "step_000000")
    mine = range(4 * rank, 4 * rank + 4)  # 8 experts, 4 per rank
    expected = {f"value/layers.{i}.ffn.experts.{w}/{e}" for i in (0, 2) for w in ("w1_SLDF", "w2_SLFD", "w3_SLDF")
                for e in mine}  # fmt: skip
    assert set(local.expert_keys_read) == expected and len(local.expert_keys_read) == len(expected)
    for name, entry in local.tensors.items():
        assert set(entry) == {"value"}, name  # weights only: no optimizer state
        if ".experts." in name:
            assert entry["value"].shape[1] == 4


def test_each_ep_rank_reads_only_the_experts_it_holds(imported):
    run_distributed(_reads_own_experts, 2, str(imported / "base"))


def test_a_job_with_another_model_is_refused_and_training_settings_are_free(imported):
    run = copy_run(imported, "refused")
    proc = run_cli("train", str(run / "config.yaml"), f"run_dir={run}", "moe.router.top_k=3", "train.steps=1")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "holds the weights of another model" in proc.stderr and "moe.router.top_k: 2 -> 3" in proc.stderr
    assert not (run / "metrics.jsonl").exists()
    proc = train(run, "moe.router.load_balance_coeff=0.05", "train.steps=1", "train.micro_batch_size=3",
                 "data.seq_len=16")  # fmt: skip
    assert "changed training-only setting: moe.router.load_balance_coeff: 0.01 -> 0.05" in proc.stdout
    assert sorted(losses(run)) == [1]


DEEPSEEK = ["train.steps=2", "train.micro_batch_size=2", "checkpoint.interval=0"]


def test_deepseek_multi_token_prediction_layers_come_back_only_with_the_untrained_weights(tmp_path, capsys):
    """The Hub's DeepSeek-V3 checkpoints carry layer N (multi-token prediction), which DeepseekV3ForCausalLM
    does not run: the import keeps it beside the step-0 checkpoint, whose export gives back every source
    tensor bit for bit; after training, the export leaves it out and says so (num_nextn_predict_layers 0)."""
    src = tmp_path / "src"
    hf_folder("deepseek_v3-dense1-shared1-yarn", src, "files")
    tensors = load_file(str(src / "model.safetensors"))
    mtp = {
        f"model.layers.3.{k.split('.', 3)[3]}": v.clone() for k, v in tensors.items() if k.startswith("model.layers.2.")
    }
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(32, 64)
    save_file({**tensors, **mtp}, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("num_mtp_layers", None)
    (src / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))  # as the Hub writes it
    (tmp_path / "corpus.txt").write_text(corpus(words=3000, seed=4))
    data = [f"data.paths=[{tmp_path / 'corpus.txt'}]", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    run = tmp_path / "run"
    assert main(["import", str(src), str(run), *DEEPSEEK, *data, "data.seq_len=32"]) == 0
    assert "kept unmapped.safetensors" in capsys.readouterr().out
    untrained = tmp_path / "untrained"
    assert main(["export", str(run), str(untrained)]) == 0
    back = {}
    for path in untrained.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            back.update({k: f.get_tensor(k) for k in f.keys()})
    source = {**tensors, **mtp}
    assert back.keys() == source.keys() and all(torch.equal(back[k], source[k]) for k in source)
    assert json.loads((untrained / "config.json").read_text())["num_nextn_predict_layers"] == 1
    train(run)
    trained = tmp_path / "trained"
    assert main(["export", str(run), str(trained)]) == 0
    config = json.loads((trained / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 == config["num_mtp_layers"]
    model = transformers.AutoModelForCausalLM.from_pretrained(trained)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x).logits - load_checkpoint(run).model(x).logits).abs().max().item() <= 1e-4
