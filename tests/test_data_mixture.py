"""Weighted mixtures (``data.sources``): proportions, a deterministic resumable order, per-source
summaries and validation losses, one tokenizer for all sources, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_CONFIG, read_metrics, run_cli, run_train
from test_data_store import one_text_file

from moetrain import data
from moetrain.config.data import DataConfig
from moetrain.data.sampling import MIX_WINDOW
from moetrain.errors import UserError

pytestmark = pytest.mark.timeout(300)


def two_sources(blocks_a: int = 50, blocks_b: int = 7, seq_len: int = 4):
    """Two block sets whose tokens tell them apart: source 0 holds tokens < 1000, source 1 >= 1000."""
    a = np.arange(blocks_a * seq_len + 1, dtype=np.int64) % 1000
    b = 1000 + np.arange(blocks_b * seq_len + 1, dtype=np.int64)
    return [data.PackedBlocks(a, seq_len), data.PackedBlocks(b, seq_len)]


def draw(stream: data.TrainStream, steps: range) -> torch.Tensor:
    return torch.cat([stream.batch(s, m)[0] for s in steps for m in range(stream.grad_accum)])


def test_weights_0_9_and_0_1_give_those_proportions_over_10k_blocks():
    stream = data.TrainStream(two_sources(), seed=3, micro_batch=10, grad_accum=1, dp_rank=0, dp_size=1, weights=[9, 1])
    count = lambda first: int((draw(stream, range(first, first + 1000))[:, 0] >= 1000).sum())  # noqa: E731
    assert count(0) == 1000  # 10,000 blocks from the start: one window, exact
    assert abs(count(437) - 1000) <= 200  # 10,000 blocks across two windows: within 2 points


def test_the_order_is_a_pure_function_of_seed_and_step():
    """A fresh stream (a resumed run) at step 40 draws what the uninterrupted one drew there; another
    seed draws otherwise; two ranks take disjoint halves of the one-process batch."""
    make = lambda seed, rank=0, size=1, mb=4: data.TrainStream(  # noqa: E731
        two_sources(), seed=seed, micro_batch=mb, grad_accum=2, dp_rank=rank, dp_size=size, weights=[0.7, 0.3]
    )
    uninterrupted = draw(make(0), range(0, 60))
    resumed = draw(make(0), range(40, 60))
    assert torch.equal(uninterrupted[40 * 8 :], resumed)
    assert not torch.equal(draw(make(1), range(0, 60)), uninterrupted)
    one = make(0, mb=4)
    ranks = [make(0, r, 2, mb=2) for r in range(2)]
    for step in range(5):
        for micro in range(2):
            both = torch.cat([r.batch(step, micro)[0] for r in ranks])
            assert torch.equal(both, one.batch(step, micro)[0])


def test_each_source_walks_its_own_epochs():
    """The small source (7 blocks) repeats every 7 of its draws, each block once per epoch; the large
    one is not repeated before its 50 blocks are used."""
    stream = data.TrainStream(two_sources(), seed=0, micro_batch=1, grad_accum=1, dp_rank=0, dp_size=1, weights=[1, 1])
    firsts = {0: [], 1: []}
    for s in range(200):
        src, block = stream._block(s)
        firsts[src].append(block)
    assert sorted(firsts[1][:7]) == list(range(7)) and sorted(firsts[1][7:14]) == list(range(7))
    assert sorted(firsts[0][:50]) == list(range(50))


def test_one_source_keeps_the_one_source_order():
    blocks = two_sources()[0]
    plain = data.TrainStream(blocks, seed=5, micro_batch=3, grad_accum=1, dp_rank=0, dp_size=1)
    listed = data.TrainStream(blocks, seed=5, micro_batch=3, grad_accum=1, dp_rank=0, dp_size=1, weights=[1.0])
    assert torch.equal(draw(plain, range(30)), draw(listed, range(30)))


def test_a_weight_below_the_window_resolution_is_refused():
    with pytest.raises(UserError, match=r"data.sources\[1\]: weight 1e-06 is below 1/10000"):
        data.MixturePlan([1.0, 1e-6], seed=0)
    assert MIX_WINDOW == 10_000


def test_mixture_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.sources replaces data.paths"):
        DataConfig(paths=["a.txt"], sources=[{"paths": ["b.txt"], "weight": 1}])
    with pytest.raises(ValueError, match="exactly one of paths .* or hub"):
        DataConfig(sources=[{"weight": 1}])
    with pytest.raises(ValueError, match="the names .* repeat"):
        DataConfig(sources=[{"paths": ["a"], "weight": 1, "name": "x"}, {"paths": ["b"], "weight": 1, "name": "x"}])


def test_a_missing_source_path_names_its_source(tmp_path):
    good = one_text_file(tmp_path / "a.txt", 5_000)
    cfg = DataConfig(sources=[{"paths": [str(good)], "weight": 1}, {"paths": [str(tmp_path / "nope")], "weight": 1}])
    with pytest.raises(UserError, match=r"data.sources\[1\].paths\[0\]: .*nope' matches no readable data file"):
        data.check_data_reachable(cfg)


def test_a_mixture_trains_one_tokenizer_for_all_sources(tmp_path):
    a = one_text_file(tmp_path / "a.txt", 40_000)
    b = tmp_path / "b.txt"
    b.write_text("zebra quagga okapi " * 3000)
    cfg = DataConfig(
        sources=[{"paths": [str(a)], "weight": 0.5}, {"paths": [str(b)], "weight": 0.5}],
        tokenizer={"train": "bpe", "vocab_size": 300},
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
        val_fraction=0.1,
        split_chars=2048,
    )
    prepared = data.prepare_data(cfg)
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    names = {store.index["tokenizer"] for store in prepared.stores}
    assert len(names) == 1 and prepared.vocab_size == 300
    assert prepared.stores[0].fingerprint != prepared.stores[1].fingerprint
    again = data.prepare_data(cfg)  # a second preparation finds both stores and the tokenizer
    assert again.fingerprint == prepared.fingerprint and again.fingerprint.startswith("mix-")


def test_prepare_then_train_a_mixture(tmp_path):
    """`prepare` prints each source's token counts; training logs val_loss per source, and val_loss is
    their mean weighted by the mixture."""
    prose = one_text_file(tmp_path / "prose.txt", 150_000)
    other = tmp_path / "other"
    other.mkdir()
    for i in range(4):
        (other / f"{i}.txt").write_text(f"record {i}: " + "alpha beta gamma delta\n" * 800)
    cache, run = tmp_path / "cache", tmp_path / "run"
    sources = (
        f"data.sources=[{{name: prose, paths: [{prose}], weight: 0.75}}, {{name: rec, paths: [{other}], weight: 0.25}}]"
    )
    prep = run_cli("prepare", str(TINY_CONFIG), *TINY, f"data.cache_dir={cache}", sources)
    assert prep.returncode == 0, prep.stderr
    assert "source 'prose': prepared" in prep.stdout and "source 'rec': prepared" in prep.stdout
    assert "mixture: prose 75.0% of the blocks (" in prep.stdout and "rec 25.0% of the blocks (" in prep.stdout
    proc = run_train(run, str(cache), sources, "train.steps=12", "train.eval_interval=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("already prepared (nothing to tokenize)") == 2
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in evals:
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/prose"] + 0.25 * r["val_loss/rec"], rel=1e-6)
        assert r["val_loss/prose"] != r["val_loss/rec"]
    assert evals[-1]["val_loss/rec"] < evals[0]["val_loss/rec"]
    state = json.loads(next(run.glob("checkpoints/*/state.json")).read_text())
    assert state["data_fingerprint"].startswith("mix-")
    ev = run_cli("eval", str(run))  # the same weighted validation loss, on one process
    assert ev.returncode == 0, ev.stderr
    result = json.loads(next(run.glob("eval/*.json")).read_text())
    assert result["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    assert result["per_source"]["rec"] == pytest.approx(evals[-1]["val_loss/rec"], rel=1e-5)
