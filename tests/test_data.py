"""Data: packing, sharding and ordering are deterministic; the cache is built once."""

from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain import data
from moetrain.errors import UserError


def test_byte_tokenizer_roundtrip():
    tok = data.ByteTokenizer()
    ids = tok.encode("héllo")
    assert bytes(ids.astype(np.uint8)).decode() == "héllo" and tok.vocab_size == 257


def test_packed_blocks_shift_targets_by_one():
    blocks = data.PackedBlocks(np.arange(25, dtype=np.uint16), seq_len=4)
    assert blocks.num_blocks == 6
    x, y, segments = blocks.get([0, 5])
    assert segments is None  # plain text: one sequence per row
    assert x.tolist() == [[0, 1, 2, 3], [20, 21, 22, 23]]
    assert y.tolist() == [[1, 2, 3, 4], [21, 22, 23, 24]]


def _stream(rank, world, micro=2, accum=1, seed=3):
    blocks = data.PackedBlocks(np.arange(401, dtype=np.uint16), seq_len=4)  # 100 blocks
    return data.TrainStream(blocks, seed, micro, accum, rank, world)


def test_order_is_a_pure_function_of_seed_and_step():
    a, b = _stream(0, 1), _stream(0, 1)
    for step in (0, 7, 49, 50, 123):  # 50 steps of 2 = one epoch of 100 blocks: crosses epochs
        assert torch.equal(a.batch(step, 0)[0], b.batch(step, 0)[0])
    assert not torch.equal(_stream(0, 1, seed=4).batch(0, 0)[0], a.batch(0, 0)[0])


def test_epoch_is_a_permutation_of_all_blocks():
    s = _stream(0, 1)
    firsts = [int(s.batch(step, 0)[0][i, 0]) // 4 for step in range(50) for i in range(2)]
    assert sorted(firsts) == list(range(100))


def test_data_parallel_ranks_split_the_same_global_stream():
    """Rank r takes slice r of each global micro-batch: 2 ranks x 2 = 1 rank x 4 = 1 rank x 2 x accum 2."""
    one = _stream(0, 1, micro=4)
    ranks = [_stream(r, 2, micro=2) for r in range(2)]
    accum = _stream(0, 1, micro=2, accum=2)
    for step in range(5):
        whole = one.batch(step, 0)[0]
        assert torch.equal(torch.cat([r.batch(step, 0)[0] for r in ranks]), whole)
        assert torch.equal(torch.cat([accum.batch(step, m)[0] for m in range(2)]), whole)


def test_cache_is_built_once_with_a_fingerprint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 200)
    (src / "b.jsonl").write_text('{"text": "some json text"}\n' * 300)
    cfg = data.DataConfig(paths=[str(src)], cache_dir=str(tmp_path / "cache"), seq_len=8, val_fraction=0.3)
    c1 = data.prepare_tokens(cfg)
    mtime = (c1.folder / "index.json").stat().st_mtime_ns
    c2 = data.prepare_tokens(cfg)
    assert c1 == c2 and (c2.folder / "index.json").stat().st_mtime_ns == mtime
    total = len(c1.tokens("train")) + len(c1.tokens("val"))
    assert total == len(("hello world\n" * 200).encode()) + 1 + 300 * (len("some json text") + 1)
    (src / "a.txt").write_text("changed\n" * 300)
    assert data.prepare_tokens(cfg).fingerprint != c1.fingerprint


def test_missing_path_names_the_field(tmp_path):
    cfg = data.DataConfig(paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match=r"data.paths\[0\]: .*nope.txt' matches no readable data file"):
        data.check_data_reachable(cfg)


def test_default_corpus_is_the_standard_library():
    files = data.default_corpus_files()
    assert len(files) > 100 and any(p.name == "os.py" for p in files)
    assert all(Path(p).suffix == ".py" for p in files)


def test_val_split_is_held_out_and_fixed():
    blocks = data.PackedBlocks(np.arange(81, dtype=np.uint16), seq_len=4)
    a = [x for x, _, _ in data.val_batches(blocks, 2, 3, dp_rank=0, dp_size=1)]
    r = [[x for x, _, _ in data.val_batches(blocks, 1, 3, dp_rank=k, dp_size=2)] for k in range(2)]
    assert torch.equal(torch.cat([r[0][0], r[1][0]]), a[0])
