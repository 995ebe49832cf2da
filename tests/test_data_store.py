"""The token store: sharded, streamed, published atomically, opened by every rank; splits for any corpus."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, TINY_CONFIG, clean_env, read_metrics, run_cli, run_train

from moetrain import data
from moetrain.errors import UserError

pytestmark = pytest.mark.timeout(300)


def one_text_file(path: Path, min_bytes: int) -> Path:
    """A single text file of real text (standard-library sources, blank lines between them)."""
    with open(path, "wb") as f:
        written = 0
        for src in data.default_corpus_files():
            if written >= min_bytes:
                break
            written += f.write(src.read_bytes() + b"\n\n")
    return path


# --- the split rule -----------------------------------------------------------------------------------


def test_val_takes_piece_zero_then_every_1_over_f_th():
    assert [i for i in range(12) if data.is_val_piece(i, 0.25)] == [0, 4, 8]
    assert [i for i in range(120) if data.is_val_piece(i, 0.02)] == [0, 50, 100]  # 50 * 0.02 is exactly 1


def test_pieces_cut_at_blank_lines_and_concatenate_back():
    paragraph = "line one\nline two\n\n"  # 19 characters
    text = paragraph * 30
    pieces = list(data.cut_pieces([text[:100], text[100:]], max_chars=64))  # chunks split mid-paragraph
    assert "".join(p for p, _ in pieces) == text
    assert all(len(p) <= 64 for p, _ in pieces) and [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.endswith("\n\n") for p, _ in pieces[:-1])
    assert [p for p, _ in data.cut_pieces(["x" * 10], 4)] == ["xxxx", "xxxx", "xx"]  # no line break: anywhere


def test_one_large_file_gives_a_train_and_a_val_split(tmp_path):
    src = one_text_file(tmp_path / "book.txt", 120_000)
    cfg = data.DataConfig(paths=[str(src)], cache_dir=str(tmp_path / "cache"), seq_len=32)
    store = data.prepare_tokens(cfg)
    train, val = store.tokens("train"), store.tokens("val")
    assert len(train) > 100_000 and 4000 < len(val) < 20_000
    assert len(train) + len(val) == src.stat().st_size + 1  # every byte, and one end-of-document token
    index = store.index
    assert index["documents"] == 1 and index["splits"]["val"]["pieces"] == 1  # ceil(n * 0.02) of n ~ 15
    assert val[:100].tobytes() != train[:100].tobytes()


def test_a_too_small_corpus_says_the_sizes_and_the_fix(tmp_path):
    src = tmp_path / "note.txt"
    src.write_text("a short note\n" * 40)  # 520 characters: one piece, which val takes
    cfg = data.DataConfig(paths=[str(src)], cache_dir=str(tmp_path / "cache"), seq_len=32)
    with pytest.raises(UserError) as exc:
        data.prepare_tokens(cfg)
    msg = str(exc.value)
    assert "the corpus gives 0 train and 521 val tokens (1 pieces of at most data.split_chars=8192" in msg
    assert "data.seq_len + 1 = 33 tokens" in msg and "lower data.split_chars" in msg
    ok = cfg.model_copy(update={"split_chars": 256})  # 3 pieces: val takes the first
    assert len(data.prepare_tokens(ok).tokens("train")) >= 33


# --- the store ----------------------------------------------------------------------------------------


def test_slices_across_shard_boundaries_equal_the_unsharded_tokens(tmp_path):
    src = one_text_file(tmp_path / "a.txt", 30_000)
    cfg = data.DataConfig(paths=[str(src)], cache_dir=str(tmp_path / "one"), seq_len=8, val_fraction=0.1)
    flat = data.prepare_tokens(cfg).tokens("train")
    store = data.prepare_tokens(cfg.model_copy(update={"cache_dir": str(tmp_path / "many")}), shard_tokens=1000)
    sharded = store.tokens("train")
    shards = store.index["splits"]["train"]["shards"]
    assert len(shards) > 20 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert sorted(p.name for p in store.folder.iterdir())[:2] == ["index.json", "train_00000.bin"]
    assert len(sharded) == len(flat) and store.fingerprint == data.prepare_tokens(cfg).fingerprint
    reference = np.asarray(flat[0 : len(flat)])
    for a, b in [(0, 1000), (990, 1010), (999, 1001), (1500, 4500), (0, len(flat)), (len(flat) - 3, len(flat) + 5)]:
        assert np.array_equal(sharded[a:b], reference[a:b]), (a, b)
    assert sharded[1000] == reference[1000] and sharded[-1] == reference[-1] and sharded[5:5].size == 0


def test_two_ranks_see_disjoint_samples_of_the_same_global_order(tmp_path):
    src = one_text_file(tmp_path / "a.txt", 30_000)
    cfg = data.DataConfig(paths=[str(src)], cache_dir=str(tmp_path / "c"), seq_len=8, val_fraction=0.1)
    blocks = data.PackedBlocks(data.prepare_tokens(cfg, shard_tokens=1000).tokens("train"), seq_len=8)
    one = data.TrainStream(blocks, 0, 4, 1, 0, 1)
    ranks = [data.TrainStream(blocks, 0, 2, 1, r, 2) for r in range(2)]
    for step in range(6):
        a, b = (set(r.sample_indices(step, 0)) for r in ranks)
        assert not a & b and a | b == set(one.sample_indices(step, 0))
        assert torch.equal(torch.cat([r.batch(step, 0)[0] for r in ranks]), one.batch(step, 0)[0])


def test_the_store_does_not_depend_on_the_number_of_workers(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        one_text_file(src / f"{i}.txt", 5_000 * (i + 1))
    cfg = data.DataConfig(paths=[str(src)], seq_len=8, val_fraction=0.2, split_chars=1024)
    stores = [
        data.prepare_tokens(cfg.model_copy(update={"cache_dir": str(tmp_path / f"w{w}"), "num_workers": w}))
        for w in (0, 2)
    ]
    assert stores[0].index["workers"] == 0 and stores[1].index["workers"] == 2
    assert stores[0].index["splits"] == stores[1].index["splits"]
    for split in ("train", "val"):
        a, b = (s.tokens(split) for s in stores)
        assert np.array_equal(a[0 : len(a)], b[0 : len(b)])


def test_other_ranks_wait_for_the_index_file(tmp_path):
    src = one_text_file(tmp_path / "a.txt", 30_000)
    cfg = data.DataConfig(paths=[str(src)], cache_dir=str(tmp_path / "c"), seq_len=8)
    with pytest.raises(
        UserError, match=r"waited 1 s for rank 0 to publish the token store .* `moetrain prepare CONFIG`"
    ):
        data.wait_for_tokens(cfg, idle_timeout_s=1)
    threading.Timer(0.5, data.prepare_tokens, (cfg,)).start()  # "rank 0", half a second late
    store = data.wait_for_tokens(cfg, idle_timeout_s=30)
    assert len(store.tokens("train")) > 20_000


# --- the CLI ------------------------------------------------------------------------------------------


def test_prepare_once_then_train_on_one_text_file(tmp_path):
    """One text file trains (val non-empty, loss falls); train opens the store `prepare` made."""
    src = one_text_file(tmp_path / "corpus.txt", 400_000)
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = ["prepare", str(TINY_CONFIG), *TINY, f"data.cache_dir={cache}", f"data.paths=[{src}]"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert f"prepared {cache}/" in first.stdout and "1 documents" in first.stdout and "MB/s" in first.stdout
    index = next(cache.glob("*/index.json"))
    mtime = index.stat().st_mtime_ns
    second = run_cli(*args)
    assert second.returncode == 0 and "already prepared (nothing to tokenize)" in second.stdout
    proc = run_train(run, str(cache), f"data.paths=[{src}]", "train.steps=20", "train.eval_interval=10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "already prepared (nothing to tokenize)" in proc.stdout and index.stat().st_mtime_ns == mtime
    records = read_metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert len(evals) == 3 and evals[-1] < evals[0]


@pytest.mark.multiproc
def test_two_ranks_start_on_a_missing_store(tmp_path):
    """Rank 0 prepares the store inside the job; rank 1 waits for its index file, then both train."""
    src = one_text_file(tmp_path / "corpus.txt", 200_000)
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_train(run, str(cache), f"data.paths=[{src}]", "train.steps=2", "train.micro_batch_size=2", nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"prepared {cache}/") == 1 and "already prepared" not in proc.stdout
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2] and len(list(cache.iterdir())) == 1


def test_a_killed_prepare_is_never_used_and_the_rerun_succeeds(tmp_path):
    src = _big_corpus(tmp_path, 64)
    cache = tmp_path / "cache"
    args = ["prepare", str(TINY_CONFIG), f"data.cache_dir={cache}", f"data.paths=[{src}]", "data.max_tokens=null"]
    cmd = [sys.executable, "-m", "moetrain.cli", *args]
    proc = subprocess.Popen(
        [*cmd, "data.num_workers=2"], cwd=REPO, env=clean_env(), start_new_session=True, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in cache.glob("*.tmp-*/train_*.bin")):  # mid-way: tokens written
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its tokenizer workers
    proc.wait()
    assert [p.name.split(".")[1][:4] for p in cache.iterdir()] == ["tmp-"]  # nothing published
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    (store,) = cache.iterdir()  # the stale temp folder is gone
    assert (store / "index.json").is_file() and "prepared" in rerun.stdout


def _big_corpus(tmp_path: Path, copies: int) -> Path:
    para = one_text_file(tmp_path / "seed.txt", 1_000_000).read_bytes()
    src = tmp_path / "big.txt"
    with open(src, "wb") as f:
        for _ in range(copies):
            f.write(para)
    return src


def test_a_worker_killed_mid_way_fails_the_preparation_instead_of_hanging(tmp_path):
    """The OOM killer's case: a tokenizer worker dies mid-way; preparation raises a message naming the
    signal and data.num_workers, publishes nothing, leaves no temp folder and no worker behind.
    (multiprocessing.Pool waits forever for the lost chunk; ProcessPoolExecutor, sometimes, for the rest
    of a result the worker was writing when it died.)"""
    cfg = data.DataConfig(paths=[str(_big_corpus(tmp_path, 64))], seq_len=8, cache_dir=str(tmp_path / "cache"))
    cfg = cfg.model_copy(update={"num_workers": 2})
    killed: list[int] = []

    def kill_a_worker():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            if any(p.stat().st_size for p in Path(cfg.cache_dir).glob("*.tmp-*/train_*.bin")):  # mid-way
                child = multiprocessing.active_children()[0]
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
            time.sleep(0.001)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    died = r"tokenizer worker \d of 2 \(pid \d+\) was killed by SIGKILL .* \(data.num_workers, now 2\)"
    with pytest.raises(RuntimeError, match=died):
        data.prepare_tokens(cfg)
    killer.join()
    assert killed and not multiprocessing.active_children()
    assert list(Path(cfg.cache_dir).iterdir()) == []


def test_stopping_early_at_max_tokens_leaves_no_worker_behind(tmp_path):
    cfg = data.DataConfig(paths=[str(_big_corpus(tmp_path, 16))], seq_len=8, cache_dir=str(tmp_path / "cache"))
    store = data.prepare_tokens(cfg.model_copy(update={"num_workers": 2, "max_tokens": 100_000}))
    assert store.index["workers"] == 2 and 100_000 <= len(store.tokens("train")) + len(store.tokens("val"))
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("kind", ["empty", "binary", "unreadable"])
def test_a_bad_source_gives_one_clear_error(tmp_path, kind):
    src = tmp_path / "data.txt"
    if kind == "empty":
        src.write_text("")
        expected = f"error: data.paths[0]: '{src}' holds no text (it is empty); add text or remove it"
    elif kind == "binary":
        src.write_bytes(b"text at first\n" + bytes(range(0, 128)) * 4)
        expected = f"error: data file '{src}' looks binary, not text: byte 14 is 0x00; remove it from data.paths"
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any file: chmod cannot make one unreadable")
        src.write_text("some text\n" * 100)
        src.chmod(0)
        expected = f"error: data.paths[0]: '{src}' is not readable (check its permissions)"
    cache = tmp_path / "cache"
    proc = run_cli("prepare", str(TINY_CONFIG), f"data.cache_dir={cache}", f"data.paths=[{src}]")
    assert proc.returncode == 2 and proc.stderr.startswith(expected) and len(proc.stderr.splitlines()) == 1
    assert not cache.exists()
