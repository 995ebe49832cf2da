"""``moetrain eval`` and ``moetrain generate`` on checkpoints trained here through the real CLI.

- eval reproduces the ``val_loss`` training logged at a checkpoint's step, also for a checkpoint saved by
  2 processes under expert parallelism (loaded on one) with StableMoE's frozen distilled routing;
- bits per byte count the bytes each token stands for (byte tokenizer, trained byte-level BPE);
- greedy generation with the KV cache equals the argmax continuation computed without it;
- bad input gives one message and exit code 2.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import read_metrics, run_cli, run_train

from moetrain.data import ByteTokenizer
from moetrain.inference.generate import Sampling, generate, next_token
from moetrain.inference.loading import load_checkpoint
from moetrain.inference.text import RunTokenizer, run_tokenizer

pytestmark = pytest.mark.timeout(600)

LLAMA = ["model.arch=llama", "model.ffn_type=swiglu", "moe.expert_type=swiglu", "model.n_kv_heads=1",
         "moe.placement=replace_ffn", "moe.router.kind=topk", "moe.router.top_k=2", "moe.router.renormalize=true"]  # fmt: skip


def trained(run_dir, data_cache, *overrides, nproc=1):
    proc = run_train(run_dir, data_cache, *overrides, nproc=nproc, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("llama") / "run"
    return trained(run, data_cache, *LLAMA, "train.steps=6", "train.eval_interval=3", "checkpoint.interval=3")


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory, data_cache):
    """tiny.yaml's StableMoE (inserted stacked experts) on 2 processes, experts sharded over both."""
    run = tmp_path_factory.mktemp("ep2") / "run"
    return trained(run, data_cache, "moe.expert_parallel_size=2", "train.micro_batch_size=2", "train.steps=4",
                   "train.eval_interval=2", "checkpoint.interval=2", "moe.router.stage1_steps=2", nproc=2)  # fmt: skip


def logged(run_dir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


def eval_cli(target, *args):
    proc = run_cli("eval", str(target), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --- eval --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [3, 6])
def test_eval_reproduces_the_logged_validation_loss(llama_run, step):
    folder = llama_run / "checkpoints" / f"step_{step:06d}"
    proc = eval_cli(folder)
    result = json.loads((llama_run / "eval" / f"step_{step:06d}.json").read_text())
    assert result["step"] == step and result["data"] == "val" and f"wrote {llama_run / 'eval'}" in proc.stdout
    assert abs(result["loss"] - logged(llama_run)[step]) <= 1e-5, (result["loss"], logged(llama_run)[step])
    assert result["logged_val_loss"] == logged(llama_run)[step]
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # byte tokenizer: every target token is one byte except end-of-document tokens (none in 32-token blocks
    # of source files is not guaranteed, so compare with the counted bytes)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / result["bytes"] / math.log(2))
    assert result["tokens"] == 2 * 4 * 32  # eval_batches x micro_batch_size x seq_len, on 1 process


def test_eval_of_a_run_dir_takes_its_newest_checkpoint(llama_run):
    proc = eval_cli(llama_run, "--out", str(llama_run / "newest.json"))
    assert json.loads((llama_run / "newest.json").read_text())["step"] == 6
    assert "training logged val_loss" in proc.stdout


@pytest.mark.multiproc
@pytest.mark.parametrize("step", [2, 4])  # stage 1 (eval: distilled router) and stage 2 (frozen)
def test_eval_on_one_process_reproduces_an_expert_parallel_run(ep_run, step):
    assert len(list((ep_run / "checkpoints" / f"step_{step:06d}").glob("experts_*.safetensors"))) == 2
    eval_cli(ep_run / "checkpoints" / f"step_{step:06d}")
    result = json.loads((ep_run / "eval" / f"step_{step:06d}.json").read_text())
    assert result["tokens"] == 2 * 2 * 2 * 32  # both ranks' batches
    assert abs(result["loss"] - logged(ep_run)[step]) <= 1e-5, (result["loss"], logged(ep_run)[step])


def test_eval_routing_override_changes_stablemoe_routing_only_where_it_should(ep_run):
    """At step 2 (stage 1) eval_routing=backbone routes otherwise, so the loss moves; the override is
    accepted because it keeps the weights."""
    out = ep_run / "backbone.json"
    eval_cli(ep_run / "checkpoints" / "step_000002", "moe.router.eval_routing=backbone", "--out", str(out))
    assert json.loads(out.read_text())["loss"] != pytest.approx(logged(ep_run)[2], abs=1e-6)


def test_eval_on_given_files(llama_run, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    eval_cli(llama_run, "--data", str(text), "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["data"] == str(text) and result["tokens"] == (len(text.read_text()) + 1 - 1) // 32 * 32
    assert result["bytes"] == result["tokens"]  # ASCII; the end-of-document token is never a target here


def test_bits_per_byte_count_the_bytes_of_a_trained_bpe(tmp_path, data_cache):
    """A run with a trained byte-level BPE: its tokens decode to exact bytes (non-ASCII included), and
    generate streams its text."""
    run = trained(tmp_path / "bpe", data_cache, *LLAMA, "data.tokenizer={train: bpe, vocab_size: 300}",
                  "train.steps=2", "train.eval_interval=0")  # fmt: skip
    loaded = load_checkpoint(run)
    tok = run_tokenizer(loaded.cfg.data, loaded.state["data_fingerprint"])
    assert tok.vocab_size == 300 and tok.token_bytes is not None
    text = "héllo wörld ✓ def f():\n\treturn 1"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode("utf-8")) and tok.num_bytes([tok.eos_id]) == 0
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text  # partial characters held back
    proc = run_cli("generate", str(run), "--prompt", "import ", "--max-new-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("import "), proc.stderr[-2000:]


def test_byte_tokenizer_bytes():
    tok = RunTokenizer(ByteTokenizer())
    ids = tok.encode("ü!")
    assert ids == [0xC3, 0xBC, 0x21] and tok.num_bytes([*ids, 256]) == 3 and tok.decode(ids) == "ü!"


# --- generate ----------------------------------------------------------------------------------------


def test_greedy_generation_equals_the_argmax_continuation_without_cache(llama_run):
    loaded = load_checkpoint(llama_run)
    tok = run_tokenizer(loaded.cfg.data, None)
    prompt = tok.encode("def ")
    got = generate(loaded.model, prompt, Sampling(max_new_tokens=20, temperature=0, stop_at_eos=False), tok.eos_id)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(loaded.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    proc = run_cli("generate", str(llama_run), "--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stop = got.index(tok.eos_id) if tok.eos_id in got else len(got)
    assert proc.stdout == "def " + tok.decode(got[:stop]) + "\n"


def test_generation_past_the_trained_length_keeps_going(llama_run):
    loaded = load_checkpoint(llama_run)
    out = generate(loaded.model, [65] * 40, Sampling(max_new_tokens=50, temperature=1.0, stop_at_eos=False), 256)
    assert len(out) == 50  # model.max_seq_len is 32: the prompt is cut and the cache rebuilt, no error


def test_sampling_is_seeded_and_filtered(llama_run):
    loaded = load_checkpoint(llama_run)

    def run(**kw):
        s = Sampling(**{"max_new_tokens": 15, "stop_at_eos": False, **kw})
        return generate(loaded.model, [100, 101], s, 256)

    assert run(temperature=1.0, seed=1) == run(temperature=1.0, seed=1)
    assert run(temperature=1.0, seed=1) != run(temperature=1.0, seed=2)
    assert run(temperature=1.0, top_k=1, seed=3) == run(temperature=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    seen = {next_token(logits, Sampling(temperature=1.0, top_p=0.7), gen) for _ in range(300)}
    assert seen == {0, 1}
    assert {next_token(logits, Sampling(temperature=1.0, top_p=0.5), gen) for _ in range(50)} == {0}
    assert {next_token(logits, Sampling(temperature=1.0, top_k=3), gen) for _ in range(400)} == {0, 1, 2}


# --- bad input ---------------------------------------------------------------------------------------


def test_a_run_dir_without_a_committed_checkpoint_is_refused(llama_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_run / "checkpoints" / "step_000006", run / "checkpoints" / "step_000006")
    (run / "checkpoints" / "step_000006" / "COMMITTED").unlink()
    for cmd in (["eval", str(run)], ["generate", str(run), "--prompt", "x"]):
        proc = run_cli(*cmd)
        assert proc.returncode == 2 and "no checkpoint in" in proc.stderr and "COMMITTED" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("eval", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "holds no committed checkpoint" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "{run}", "--out", "{run}/metrics.jsonl/x.json"], "--out: cannot write"),
        (["eval", "{run}", "model.d_model=64"], "overrides change the saved model"),
        (["generate", "{run}", "--temperature", "-1"], "--temperature (-1.0) must be >= 0"),
        (["generate", "{run}", "--top-p", "0"], "--top-p (0.0) must be in (0, 1]"),
        (["eval", "{run}/nowhere"], "is not a folder"),
    ],
)
def test_bad_input_gives_one_message_and_exit_2(llama_run, args, message):
    proc = run_cli(*[a.format(run=llama_run) for a in args])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
