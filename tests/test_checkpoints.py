"""Checkpoints that are never lost, poisoned or executed, through the real CLI.

Each test kills, corrupts or tampers at a chosen point (``MOETRAIN_FAULT`` failpoints, see
tests/faults.py, installed as a training callback) and then checks what the next run does. docs/reliability.md maps each
fault to its test.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from conftest import read_metrics, train_ok

pytestmark = pytest.mark.timeout(300)


train = train_ok


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def steps_saved(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def corrupt(folder: Path) -> None:
    shard = folder / "shared.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)
    shard.write_bytes(bytes(data))


def rewrite_manifest(folder: Path) -> None:
    from moetrain.checkpoint.manifest import MANIFEST, write_manifest

    (folder / MANIFEST).unlink()
    write_manifest(folder, 2)


STEPS6 = ["train.steps=6", "checkpoint.interval=2"]


def test_kill_mid_save_keeps_the_last_checkpoint(tmp_path, data_cache):
    run, full = tmp_path / "run", tmp_path / "full"
    train(full, data_cache, *STEPS6)
    proc = train(run, data_cache, *STEPS6, expect=-9, env={"MOETRAIN_FAULT": "kill_mid_save@4"})
    assert "fault injected" in proc.stdout
    assert steps_saved(run) == [".tmp_step_000004", "step_000002"]  # step 4 was never committed
    proc = train(run, data_cache, *STEPS6)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert steps_saved(run) == ["step_000004", "step_000006"]  # leftovers pruned after a newer commit
    assert losses(run) == losses(full)  # each step once, and the same as the uninterrupted run


def test_kill_between_commit_and_prune(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, *STEPS6, "checkpoint.keep_last=1", expect=-9, env={"MOETRAIN_FAULT": "kill_after_commit@4"})
    assert steps_saved(run) == ["step_000002", "step_000004"]  # committed, not yet pruned
    proc = train(run, data_cache, *STEPS6, "checkpoint.keep_last=1")
    assert "at step 4" in proc.stdout and steps_saved(run) == ["step_000006"]


def test_rerun_of_a_finished_run_changes_nothing(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, *STEPS6)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints" / "step_000006").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    proc = train(run, data_cache, *STEPS6)
    assert "nothing to do" in proc.stdout and "step 6" in proc.stdout and "val_loss" not in proc.stdout
    train(run, data_cache, *STEPS6, expect=-9, env={"MOETRAIN_FAULT": "kill_after_finish_check@6"})
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints" / "step_000006").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    proc = train(run, data_cache, "train.steps=8", "checkpoint.interval=2")  # extending it continues
    assert "at step 6" in proc.stdout and "train.steps: 6 -> 8" in proc.stdout and max(losses(run)) == 8


def test_no_verified_checkpoint_stops_instead_of_starting_over(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "checkpoint.interval=2")
    for step in (2, 4):
        corrupt(run / "checkpoints" / f"step_{step:06d}")
    proc = train(run, data_cache, "train.steps=6", expect=2)
    assert "no checkpoint in" in proc.stderr and "step_000002" in proc.stderr and "step_000004" in proc.stderr
    assert "Traceback" not in proc.stderr and steps_saved(run) == ["step_000002", "step_000004"]  # untouched
    proc = train(run, data_cache, "train.steps=2", "checkpoint.resume=none")
    previous = next(run.glob("previous_*"))
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert steps_saved(run) == ["step_000002"] and max(losses(run)) == 2 and min(losses(run)) == 1


def test_a_corrupt_newest_checkpoint_never_pushes_out_the_last_good_one(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=1")
    train(run, data_cache, "train.steps=6", "checkpoint.interval=2", "train.stop_at_step=5")
    assert steps_saved(run) == ["step_000004", "step_000005"]
    corrupt(run / "checkpoints" / "step_000005")
    proc = train(run, data_cache, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=1")
    assert "skipping checkpoint step_000005" in proc.stdout and "at step 4" in proc.stdout
    assert steps_saved(run) == ["step_000006"]  # the good one went only once a newer one was committed


def test_history_without_a_checkpoint_is_refused(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=2", "checkpoint.save_at_end=false")
    proc = train(run, data_cache, "train.steps=2", expect=2)
    assert "holds a run (metrics.jsonl) but no checkpoint" in proc.stderr


class _Planted:
    """Unpickling this runs a command: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_never_runs(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=2")
    ckpt = run / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    # 1. a pickle in place of the weights, with a manifest recomputed so that the sha256 sums match
    (ckpt / "shared.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    rewrite_manifest(ckpt)
    proc = train(run, data_cache, "train.steps=4", expect=2)
    assert "not a readable safetensors file" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    # 2. a checkpoint of the old pickle format (DeepSpeed .pt files) with a valid manifest of that format
    old = tmp_path / "old" / "checkpoints" / "step_000002"
    old.mkdir(parents=True)
    (old / "rank_00000.pt").write_bytes(pickle.dumps(_Planted(marker)))
    (old / "state.json").write_text(json.dumps({"step": 2}))
    from moetrain.checkpoint.manifest import sha256_of

    sums = {name: sha256_of(old / name) for name in ("rank_00000.pt", "state.json")}
    (old / "manifest.json").write_text(json.dumps({"sha256": sums}))
    (old / "COMMITTED").write_text("ok\n")
    proc = train(tmp_path / "new", data_cache, "train.steps=4", f"checkpoint.resume={old}", expect=2)
    assert "first checkpoint format (DeepSpeed pickles)" in proc.stderr and not marker.exists()


@pytest.mark.parametrize(
    "manifest, message",
    [
        ({}, "malformed or of another format"),
        ({"format": 2, "files": {}}, "lists no files"),
        ({"format": 2, "files": {"state.json": "x"}}, "malformed at 'state.json'"),
        ({"format": 2, "files": {"../../x": {"bytes": 1, "sha256": "0"}, "state.json": {}}}, "outside the checkpoint"),
        ([1, 2], "malformed or of another format"),
    ],
)
def test_malformed_manifests_are_clean_errors(tmp_path, manifest, message):
    from moetrain.checkpoint.manifest import verify

    folder = tmp_path / "step_000002"
    folder.mkdir()
    (folder / "COMMITTED").write_text("ok\n")
    (folder / "state.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert message in verify(folder, 2)


def test_resume_refuses_another_model_and_allows_safe_changes(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "train.stop_at_step=2")
    for override, line in [
        ("model.n_heads=4", "model.n_heads: 2 -> 4"),
        ("model.d_ff=128", "model.d_ff: 64 -> 128"),
        ("moe.router.kind=hash", "moe.router.kind: 'stablemoe' -> 'hash'"),
        ("optim.lr=0.01", "optim.lr: 0.003 -> 0.01"),
        ("train.micro_batch_size=2", "global batch"),
    ]:
        proc = train(run, data_cache, "train.steps=4", override, expect=2)
        assert "saved by a different job" in proc.stderr and line in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = train(run, data_cache, "train.steps=4", "logging.interval=2", "train.eval_interval=2")
    assert "resuming with a changed setting: logging.interval: 1 -> 2" in proc.stdout


def test_the_optimizer_kernel_may_change_on_resume(tmp_path, data_cache):
    """``optim.fused`` changes only rounding, and checkpoints hold no optimizer options: resuming a run
    of the per-parameter AdamW with the fused one continues it (step counts loaded where the fused
    kernel reads them) and lands within rounding of an uninterrupted fused run."""
    run, full = tmp_path / "run", tmp_path / "full"
    train(full, data_cache, "train.steps=4")
    train(run, data_cache, "train.steps=4", "train.stop_at_step=2", "optim.fused=false")
    proc = train(run, data_cache, "train.steps=4")
    assert "resuming with a changed setting: optim.fused: False -> True" in proc.stdout, proc.stdout
    got, want = losses(run), losses(full)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), step


def test_data_change_is_refused(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "train.stop_at_step=2")
    proc = train(run, data_cache, "train.steps=4", "data.max_tokens=150000", expect=2)
    assert "data.max_tokens: 200000 -> 150000" in proc.stderr


def test_nan_stops_before_the_update_and_nothing_non_finite_is_saved(tmp_path, data_cache):
    run, full = tmp_path / "run", tmp_path / "full"
    train(full, data_cache, *STEPS6)
    proc = train(run, data_cache, *STEPS6, expect=1, env={"MOETRAIN_FAULT": "nan_loss@3"})
    assert "step 3: non-finite loss" in proc.stderr and "stopped before the optimizer step" in proc.stderr
    assert steps_saved(run) == ["step_000002"]
    proc = train(run, data_cache, *STEPS6)  # the cause went away: it resumes from the last good state
    assert "at step 2" in proc.stdout and losses(run) == losses(full)


def test_nan_skip_policy_skips_counts_and_gives_up(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, data_cache, *STEPS6, "train.nonfinite=skip", env={"MOETRAIN_FAULT": "nan_loss@3:rank0"})
    records = [r for r in read_metrics(run) if "loss" in r]
    assert records[2]["step"] == 3 and records[2]["skipped_steps"] == 1 and records[-1]["step"] == 6
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 3)  # finite everywhere else
    from moetrain.checkpoint import consolidated_state_dict

    weights = consolidated_state_dict(run / "checkpoints" / "step_000006")
    assert all(bool(t.isfinite().all()) for t in weights.values())
    env = {"MOETRAIN_FAULT": "nan_loss@2,nan_loss@3,nan_loss@4"}
    proc = train(tmp_path / "give_up", data_cache, *STEPS6, "train.nonfinite=skip", "train.nonfinite_max_skips=2",
                 expect=1, env=env)  # fmt: skip
    assert "3 consecutive non-finite steps skipped" in proc.stderr


def test_non_finite_weights_are_detected_while_gathering_a_checkpoint():
    import torch

    from moetrain.config.model import ModelConfig, MoEConfig
    from moetrain.model import MoETransformer
    from moetrain.parallel.layout import ParallelLayout
    from moetrain.training.checkpoint import gather

    torch.manual_seed(0)
    model = MoETransformer(
        ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32), MoEConfig(num_experts=4)
    )
    optimizer = torch.optim.AdamW(model.parameters())
    gathered = gather(model, optimizer, ParallelLayout())
    assert not gathered.nonfinite and "value/layers.0.ffn.experts.w1_SLDF/3" in gathered.experts
    assert "buffer/pos.weight" not in gathered.shared and "value/pos.weight" in gathered.shared
    with torch.no_grad():
        model.layers[0].ffn.experts.w1_SLDF[0, 3, 0, 0] = float("nan")  # one weight of global expert 3
    assert gather(model, optimizer, ParallelLayout()).nonfinite


def test_a_checkpoint_older_than_a_new_field_resumes_while_the_field_keeps_its_default(tmp_path, data_cache):
    """A config saved before a field existed lacks it: no difference at the default, refused otherwise."""
    import json

    from moetrain.checkpoint.manifest import write_manifest

    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "train.stop_at_step=2")
    state_file = next(run.glob("checkpoints/step_*/state.json"))
    state = json.loads(state_file.read_text())
    for section, key in [("model", "norm_eps"), ("moe", "shared_experts"), ("data", "sources")]:
        del state["config"][section][key]  # as written by a release without these fields
    state_file.write_text(json.dumps(state, indent=1))
    fmt = json.loads((state_file.parent / "manifest.json").read_text())["format"]
    write_manifest(state_file.parent, fmt)  # the checksums of the edited state.json
    proc = train(run, data_cache, "train.steps=4", "moe.shared_experts=1", "moe.expert_type=gelu", expect=2)
    assert "moe.shared_experts: '<unset>' -> 1" in proc.stderr, proc.stderr
    proc = train(run, data_cache, "train.steps=4")
    assert "resumed from" in proc.stdout


def test_moving_the_corpus_keeps_the_run_and_other_tokens_need_the_override(tmp_path, data_cache):
    """Resume compares the tokens' content, not where they were read from: the same corpus copied to a new
    disk (new path, new mtime) resumes; a changed corpus is refused, naming the override, which resumes
    and says so."""
    import shutil
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((src / name).read_text() for name in ("argparse.py", "typing.py", "subprocess.py"))
    old_disk, new_disk = tmp_path / "disk_a" / "corpus.txt", tmp_path / "disk_b" / "corpus.txt"
    old_disk.parent.mkdir()
    old_disk.write_text(text)
    run = tmp_path / "run"
    train(run, data_cache, "train.steps=4", "train.stop_at_step=2", f"data.paths=[{old_disk}]")
    new_disk.parent.mkdir()
    shutil.copyfile(old_disk, new_disk)  # a new path and a new mtime: another token store, the same tokens
    old_disk.unlink()
    proc = train(run, data_cache, "train.steps=4", "train.stop_at_step=3", f"data.paths=[{new_disk}]")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout and "data.paths" in proc.stdout
    new_disk.write_text(text.replace("def ", "fun "))
    proc = train(run, data_cache, "train.steps=4", f"data.paths=[{new_disk}]", expect=2)
    assert "was trained on other data" in proc.stderr and "checkpoint.allow_data_change=true" in proc.stderr
    proc = train(run, data_cache, "train.steps=4", f"data.paths=[{new_disk}]", "checkpoint.allow_data_change=true")
    assert "continuing on the new data (checkpoint.allow_data_change)" in proc.stdout and "at step 3" in proc.stdout
