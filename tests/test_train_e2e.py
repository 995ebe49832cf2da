"""End to end through the real CLI: training, metrics, checkpoints, bitwise resume, bad input."""

import pytest
from conftest import read_metrics, train_ok

pytestmark = pytest.mark.timeout(300)


train = train_ok


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_tiny_trains_and_writes_run_dir(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = train(run, data_cache, "train.steps=12", "train.eval_interval=6", "checkpoint.interval=6")
    records = read_metrics(run)
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 13))
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    last = train_recs[-1]
    for key in (
        "lr",
        "grad_norm",
        "tokens_per_s",
        "aux_loss",
        "moe/layer0/load_min",
        "moe/layer0/load_max",
        "moe/layer0/load_std",
        "moe/layer0/dropped_frac",
        "moe/layer0/router_entropy",
        "moe/layer0/load_balance",
    ):
        assert key in last, key
    assert last["grad_norm"] > 0 and len(last["moe/layer0/load"]) == 4
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[0]["val_loss"] > 5.0 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learns
    assert (run / "config.yaml").read_text().count("vocab_size: 257") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000006", "step_000012"]
    assert (run / "checkpoints" / "step_000012" / "COMMITTED").is_file()
    assert "step 12/12 | loss" in proc.stdout and "val_loss" in proc.stdout


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.grad_accum_steps=2", "model.dropout=0.1"],
        ["train.precision=bf16"],  # fp32 master copies in DeepSpeed's FP16_UnfusedOptimizer
        # ZeRO-2's own machinery on one process (by default one process runs the stage-0 path)
        ["train.precision=bf16", "deepspeed.zero_optimization.stage=2", "train.zero_on_one_process=true"],
    ],
    ids=["plain", "accum+dropout", "bf16", "bf16-zero2"],
)
def test_resume_after_k_equals_uninterrupted(tmp_path, data_cache, extra):
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, data_cache, "train.steps=8", *extra)
    train(split, data_cache, "train.steps=8", "train.stop_at_step=3", *extra)
    assert max(losses(split)) == 3
    proc = train(split, data_cache, "train.steps=8", *extra)
    assert "resumed from" in proc.stdout
    assert losses(split) == losses(full)  # exact float equality, every step


def test_auto_resume_skips_an_interrupted_save(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=3")
    (run / "checkpoints" / "step_000004" / "COMMITTED").unlink()  # as if killed mid-save
    proc = train(run, data_cache, "train.steps=6")
    assert "skipping checkpoint step_000004" in proc.stdout and "at step 2" in proc.stdout


def test_explicit_corrupt_checkpoint_is_refused_and_nothing_written(tmp_path, data_cache):
    src = tmp_path / "src"
    train(src, data_cache, "train.steps=2")
    ckpt = src / "checkpoints" / "step_000002"
    shard = ckpt / "shared.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10:] = bytes(10)  # corrupt, same size
    shard.write_bytes(bytes(data))
    run = tmp_path / "new"
    proc = train(run, data_cache, "train.steps=4", f"checkpoint.resume={ckpt}", expect=2)
    assert "does not match its sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()
    shard.write_bytes(bytes(data[:100]))  # truncated
    proc = train(run, data_cache, "train.steps=4", f"checkpoint.resume={ckpt}", expect=2)
    assert "the manifest says" in proc.stderr and "truncated" in proc.stderr and not run.exists()
    proc = train(run, data_cache, f"checkpoint.resume={tmp_path / 'nowhere'}", expect=2)
    assert "is not a folder" in proc.stderr and not run.exists()


def test_missing_data_path_fails_cleanly(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = train(run, data_cache, f"data.paths=[{tmp_path / 'missing.txt'}]", expect=2)
    assert "data.paths[0]:" in proc.stderr and "matches no readable data file" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


def test_dense_baseline_and_replace_ffn_placement(tmp_path, data_cache):
    train(tmp_path / "dense", data_cache, "moe=null", "train.steps=2")
    assert not any("moe/layer0/load_min" in r for r in read_metrics(tmp_path / "dense"))
    train(
        tmp_path / "k2",
        data_cache,
        "train.steps=2",
        "moe.placement=replace_ffn",
        "moe.every=1",
        "moe.expert_type=swiglu",
        "moe.router.kind=topk",
        "moe.router.top_k=2",
        "moe.capacity_factor=1.0",
        "moe.router.z_loss_coeff=0.001",
    )
    rec = next(r for r in read_metrics(tmp_path / "k2") if "loss" in r)
    assert "moe/layer1/load_min" in rec and "moe/layer0/z_loss" in rec and 0 <= rec["moe/layer0/dropped_frac"] < 1


def test_a_lone_process_binds_no_port(tmp_path, data_cache):
    """One process gets an in-process store: a port another process holds (here MASTER_PORT, bound by this
    test) does not matter. It used to pick a free port and bind it seconds later: EADDRINUSE when another
    process took it in between (seen under the 2-worker suite)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        train(tmp_path / "run", data_cache, "train.steps=1", env={"MASTER_PORT": port, "MASTER_ADDR": "127.0.0.1"})
