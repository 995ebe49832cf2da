"""Training on chat data through the CLI: the masked validation loss falls, one process and EP 2 give the same
per-step losses (1e-5) because the loss is one mean over the global batch's target tokens; ``moetrain eval``
reproduces the masked validation loss on one process and says it is masked; ``generate --chat`` answers
with the template and stops at its end of turn. Text under ``data.document_masking`` trains too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from chat_data import CHAT_CONFIG, CHAT_SMALL
from conftest import REPO, clean_env, read_metrics, run_cli, run_train

from moetrain.inference.generate import ReplyStream

pytestmark = pytest.mark.timeout(900)

STEPS = 10
SMALL = [
    "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64", "moe.expert_hidden=32",
    f"train.steps={STEPS}", "train.eval_interval=5", f"checkpoint.interval={STEPS}", "logging.interval=1",
    "optim.lr=5e-3", "optim.warmup_steps=2", "optim.eps=1e-6", "train.grad_accum_steps=2", "checkpoint.resume=none",
]  # fmt: skip


def chat_train(run_dir, cache, *overrides, nproc=1):
    args = ["train", str(CHAT_CONFIG), *SMALL, f"data.cache_dir={cache}", f"run_dir={run_dir}", *overrides]
    if nproc == 1:
        proc = run_cli(*args, timeout=600)
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        proc = subprocess.run(
            [*head, "-m", "moetrain.cli", *args], capture_output=True, text=True, env=clean_env(), timeout=600, cwd=REPO
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same global batch (8 rows: 2 micro-batches of 4) on one process, and on 2 under EP 2 (2 micro-batches
    of 2 rows per rank): a per-micro-batch mean would weigh the target tokens differently in the two."""
    tmp = tmp_path_factory.mktemp("chat")
    cache = tmp / "cache"
    one = chat_train(tmp / "one", cache, "train.micro_batch_size=4")
    ep = chat_train(tmp / "ep", cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2", nproc=2)
    return one, ep


def losses(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.mark.multiproc
def test_one_process_and_ep2_give_the_same_masked_losses_and_the_loss_falls(runs):
    one, ep = runs
    for key in ("loss", "val_loss"):
        a, b = losses(one, key), losses(ep, key)
        assert sorted(a) == sorted(b) and len(a) >= 3
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (key, step, a[step], b[step])
    val = losses(one, "val_loss")
    assert val[STEPS] < val[5] < val[0] - 0.5, val  # from ~5.5 nats (uniform over 257 bytes) down


@pytest.mark.multiproc
def test_eval_reproduces_the_masked_validation_loss_of_the_ep_run(runs):
    _, ep = runs
    proc = run_cli("eval", str(ep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ep / "eval" / f"step_{STEPS:06d}.json").read_text())
    assert result["masked"] is True and f"masked loss {result['loss']:.4f}" in proc.stdout
    assert "counts the" in proc.stdout and "target tokens of the loss mask only" in proc.stdout
    assert abs(result["loss"] - losses(ep, "val_loss")[STEPS]) <= 1e-5


def test_eval_on_given_chat_files_packs_and_masks_them_as_training_does(runs, tmp_path):
    """``--data`` with chat records: encoded, packed and scored as training would (every row of the file);
    the same records prepared as a store and evaluated through it give the same loss."""
    one, _ = runs
    out = tmp_path / "files.json"
    proc = run_cli("eval", str(one), "--data", str(CHAT_SMALL), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["masked"] is True and "masked loss" in proc.stdout
    from moetrain import data
    from moetrain.inference.evaluate import score
    from moetrain.inference.loading import load_checkpoint
    from moetrain.inference.text import run_tokenizer

    loaded = load_checkpoint(one)
    cfg = loaded.cfg.data.model_copy(update={"cache_dir": str(tmp_path / "c"), "val_fraction": 0.001})
    rows = [data.split_rows(data.prepare_tokens(cfg), split, cfg) for split in ("train", "val")]
    micro = loaded.cfg.train.micro_batch_size
    batches = [r.get(list(range(i, min(i + micro, r.num_blocks)))) for r in rows for i in range(0, r.num_blocks, micro)]
    _, nll, tokens, _ = score(loaded.model, batches, run_tokenizer(loaded.cfg.data, None))
    assert tokens == result["tokens"] and abs(nll / tokens - result["loss"]) < 1e-5  # other rows, same samples


def test_generate_chat_renders_the_prompt_and_stops_at_the_end_of_turn(runs):
    one, _ = runs
    proc = run_cli(
        "generate", str(one), "--chat", "--prompt", "What is 2 + 2?", "--max-new-tokens", "60", "--temperature", "0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "What is 2 + 2?" not in proc.stdout and "<|" not in proc.stdout  # the reply alone, no template markers
    proc = run_cli("generate", str(one), "--system", "x", "--prompt", "hi")
    assert proc.returncode == 2 and "--system is a message of a chat: add --chat" in proc.stderr


class Decoder:
    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, token):
        return self.pieces[token]

    def flush(self):
        return ""


def test_the_reply_stream_holds_back_what_may_be_the_end_of_turn():
    stream = ReplyStream(Decoder(["Hel", "lo <", "|en", "d|>", "more"]), "<|end|>")
    shown = [stream.push(i) for i in range(3)]
    assert shown == ["Hel", "lo ", ""] and not stream.done  # "<|en" might be the marker: held back
    assert stream.push(3) == "" and stream.done and stream.push(4) == ""
    stream = ReplyStream(Decoder(["a<", "b"]), "<|end|>")
    assert stream.push(0) == "a" and stream.push(1) == "<b" and stream.flush() == ""  # not the marker after all


def test_document_masking_trains_on_text_and_eval_reproduces_it(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = run_train(run, data_cache, "data.document_masking=true", "train.steps=3", "train.eval_interval=3",
                     "checkpoint.interval=3", "model.max_seq_len=32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("eval", str(run))
    assert proc.returncode == 0 and "masked loss" in proc.stdout, proc.stderr[-3000:]
    result = json.loads((run / "eval" / "step_000003.json").read_text())
    assert result["masked"] is True
    assert abs(result["loss"] - losses(run, "val_loss")[3]) <= 1e-5
