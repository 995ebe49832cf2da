"""Tokenizers through the real CLI: a byte-level BPE trained by moetrain (round trip, determinism, a
training run that trains it once), a tokenizer.json given by path, and bad values (one error, exit 2)."""

import json
import shutil

import pytest
import yaml
from conftest import TINY, TINY_CONFIG, read_metrics, run_cli, run_train

from moetrain.data import build_tokenizer

pytestmark = pytest.mark.timeout(300)

BPE_512 = "data.tokenizer={train: bpe, vocab_size: 512, max_chars: 2000000}"  # ~0.5 s of training


def train_tokenizer(cache, *args, env=None):
    proc = run_cli("tokenizer", "train", str(TINY_CONFIG), f"data.cache_dir={cache}", *args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (cache / "tokenizers").glob("*/tokenizer.json")
    return path, proc.stdout


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A 512-token byte-level BPE trained on 2 M characters of the built-in corpus."""
    cache = tmp_path_factory.mktemp("bpe")
    path, out = train_tokenizer(cache, BPE_512)
    assert "trained a byte-level BPE of 512 tokens on 2.0 M characters" in out and str(path) in out
    return path


def test_trained_bpe_round_trips_text(bpe_file):
    tok = build_tokenizer(str(bpe_file))
    assert (tok.vocab_size, tok.eos_id) == (512, 0)  # <|endoftext|> is id 0
    for text in [
        "hello world",
        "  leading spaces, trailing tab\t\n\n",
        "héllo wörld — naïve café 日本語のテキスト 🙂👍🏽",
        "def f(x):\n    return {'a': [x ** 2 for x in range(3)]}  # comment\r\n",
        "<|endoftext|> is text here, not the special token",
    ]:
        ids = tok.encode(text)
        assert 0 < len(ids) and ids.max() < 512
        assert tok.decode(ids) == text
    assert len(tok.encode("def return import self")) < len("def return import self")  # it merged something


def test_training_is_deterministic_across_thread_counts(tmp_path, bpe_file):
    again, _ = train_tokenizer(tmp_path, BPE_512, env={"RAYON_NUM_THREADS": "1"})
    assert again.relative_to(tmp_path).parts[1] == bpe_file.parent.name  # same settings, same fingerprint
    assert again.read_bytes() == bpe_file.read_bytes()


def test_vocab_size_flag_and_out(tmp_path):
    out = tmp_path / "mine"  # a folder, made when missing
    path, stdout = train_tokenizer(tmp_path / "cache", "--vocab-size", "300", "--out", str(out))
    assert (out / "tokenizer.json").read_bytes() == path.read_bytes()
    assert build_tokenizer(str(out)).vocab_size == 300  # a folder holding a tokenizer.json works too
    assert "data.tokenizer={train: bpe, vocab_size: 300}" in stdout


def test_trained_bpe_config_trains_once(tmp_path):
    cache = tmp_path / "cache"
    bpe = "data.tokenizer={train: bpe, vocab_size: 512}"
    proc = run_train(tmp_path / "run1", str(cache), bpe, "train.steps=20", "train.eval_interval=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained a byte-level BPE of 512 tokens" in proc.stdout and "prepared" in proc.stdout
    losses = [r["loss"] for r in read_metrics(tmp_path / "run1") if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.3, losses  # 6.25 (ln 512) -> ~5.7
    saved = yaml.safe_load((tmp_path / "run1" / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 512 and saved["data"]["tokenizer"]["train"] == "bpe"

    proc = run_train(tmp_path / "run2", str(cache), bpe, "train.steps=2", "train.eval_interval=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained a byte-level BPE" not in proc.stdout and "already prepared" in proc.stdout
    assert len(list((cache / "tokenizers").iterdir())) == 1


def prepare(cache, *overrides):
    return run_cli("prepare", str(TINY_CONFIG), *TINY, f"data.cache_dir={cache}", *overrides)


def test_tokenizer_json_by_path(tmp_path, bpe_file):
    proc = prepare(tmp_path / "cache", f"data.tokenizer={bpe_file}")
    assert proc.returncode == 0 and "prepared" in proc.stdout, proc.stderr[-3000:]
    (index,) = (tmp_path / "cache").glob("*/index.json")
    assert json.loads(index.read_text())["vocab_size"] == 512
    # the store is keyed by the file's content, not its path: a copy finds it, an edit re-tokenizes
    copy = tmp_path / "elsewhere" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copyfile(bpe_file, copy)
    proc = prepare(tmp_path / "cache", f"data.tokenizer={copy.parent}")
    assert proc.returncode == 0 and "already prepared" in proc.stdout, proc.stderr[-3000:]
    copy.write_text(copy.read_text().replace('"<|endoftext|>"', '"</s>"'))
    proc = prepare(tmp_path / "cache", f"data.tokenizer={copy}")
    assert proc.returncode == 0 and "already prepared" not in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "value, expect",
    [
        ("{train: bpe, vocab_size: 100}", ["data.tokenizer", "vocab_size 100 is too small", "at least 260"]),
        ("{train: bpe, vocab: 512}", ["data.tokenizer", "unknown key 'vocab'", "vocab_size is missing"]),
        ("MISSING/tokenizer.json", ["data.tokenizer", "missing/tokenizer.json", "does not exist"]),
        ("NOT_A_TOKENIZER", ["data.tokenizer", "not_a_tokenizer.json", "is not a tokenizer.json"]),
    ],
    ids=["too-small", "bad-key", "missing-file", "not-a-tokenizer"],
)
def test_bad_tokenizer_is_one_error(tmp_path, value, expect):
    bad = tmp_path / "not_a_tokenizer.json"
    bad.write_text('{"vocab": {"a": 0}}')
    value = value.replace("MISSING", str(tmp_path / "missing")).replace("NOT_A_TOKENIZER", str(bad))
    proc = prepare(tmp_path / "cache", f"data.tokenizer={value}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in expect:
        assert part in proc.stderr, (part, proc.stderr)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing written
