"""``moetrain import``: every family variant, imported from a folder transformers wrote, computes what
transformers computes, through the commands a user runs (tests/hf_runs.py builds the folders offline).

For each variant of tests/hf_tiny.py and tests/test_deepseek_v3.py (one tensor per expert, sharded with an
index, transformers 5's fused experts, bf16 weights), imported with ``moetrain import``:

- the checkpoint's logits equal transformers' within 1e-5 (fp32) on random tokens;
- ``moetrain generate --temperature 0`` prints transformers' greedy ``generate`` continuation;
- ``moetrain eval --data FILE`` gives the loss transformers computes on the same blocks, tokenized by the
  source's tokenizer as transformers' ``AutoTokenizer`` tokenizes them;
- ``moetrain export`` of the untrained import gives back the source's weights bit for bit, loaded natively
  (no remote code) by the same class with the same config as transformers reads it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hf_runs import LAYOUTS, VARIANTS, VOCAB, corpus, hf_folder
from safetensors import safe_open

from moetrain.checkpoint import read_state
from moetrain.cli import main
from moetrain.inference.loading import load_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(corpus(words=700, seed=7))
    return path


def cli(capsys, *args: str) -> str:
    """``moetrain ARGS`` in this process; returns what it printed (exit code 0 asserted)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def file_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def transformers_loss(hf, tok, text: str, seq_len: int) -> tuple[float, int]:
    """Mean next-token loss over every block of seq_len + 1 tokens of ``text`` + end-of-document, as
    ``moetrain eval --data`` blocks a one-document file; and the number of targets."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = (len(ids) - 1) // seq_len
    rows = torch.tensor([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].reshape(-1), reduction="sum")
    return loss.item() / rows[:, 1:].numel(), rows[:, 1:].numel()


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_imported_model_computes_what_transformers_computes(variant, tmp_path, capsys, text_file):
    src, run = tmp_path / "src", tmp_path / "run"
    hf, tok = hf_folder(variant, src)
    out = cli(capsys, "import", src, run)
    assert f"imported into {run}; train it: moetrain train {run / 'config.yaml'}" in out
    state = read_state(run / "checkpoints" / "step_000000")
    assert state["weights_only"] and state["step"] == 0 and "param_groups" not in state
    loaded = load_checkpoint(run)
    assert loaded.cfg.data.tokenizer == str(run / "tokenizer")

    # logits on random tokens
    x = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = hf(x).logits, loaded.model(x).logits
    assert theirs.std() > 0.3 and (theirs - ours).abs().max().item() <= 1e-5

    # greedy generation through the CLI vs transformers' generate
    prompt = "the quick brown fox"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=20, eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    new = new[: new.index(2)] if 2 in new else new
    assert len(new) >= 4, new  # a real continuation
    printed = cli(capsys, "generate", run, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20")
    assert printed == prompt + tok.decode(new) + "\n"

    # eval of a file vs transformers' loss on the same blocks
    result_file = tmp_path / "eval.json"
    cli(capsys, "eval", run, "--data", text_file, "--out", result_file)
    result = json.loads(result_file.read_text())
    loss, targets = transformers_loss(hf, tok, text_file.read_text(), loaded.cfg.data.seq_len)
    assert result["tokens"] == targets and abs(result["loss"] - loss) <= 1e-5, (result["loss"], loss)

    # export of the untrained import: the source's weights bit for bit, natively loadable
    exported = tmp_path / "hf"
    printed = cli(capsys, "export", run, exported)
    architecture = hf.config.architectures[0] if hf.config.architectures else type(hf).__name__
    assert f": {type(hf).__name__}," in printed and "trust_remote_code" not in printed, (architecture, printed)
    assert not (exported / "modeling_moetrain.py").exists()
    assert_same_weights(src, exported, LAYOUTS.get(variant, "files"))
    back, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert type(back) is type(hf) and not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert same_config(transformers.AutoConfig.from_pretrained(src), back.config)
    assert transformers.AutoTokenizer.from_pretrained(exported)(prompt)["input_ids"] == tok(prompt)["input_ids"]


def assert_same_weights(src, exported, layout: str) -> None:
    """Export writes one tensor per expert in fp32: the files' tensors equal the source's bit for bit (a bf16
    source: exactly its values, and the same bits once cast back); a fused source compares as loaded."""
    theirs, ours = file_tensors(src), file_tensors(exported)
    if layout == "fused":
        load = transformers.AutoModelForCausalLM.from_pretrained
        theirs, ours = load(src).state_dict(), load(exported).state_dict()
    assert theirs.keys() == ours.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == (torch.float32 if t.is_floating_point() else t.dtype), name
        assert torch.equal(ours[name].to(t.dtype), t) and torch.equal(ours[name], t.to(ours[name].dtype)), name


def same_config(a, b) -> bool:
    """The same model as transformers reads the two config.json files (the dtype and the version aside:
    the export is fp32)."""
    skip = {"dtype", "transformers_version", "_name_or_path"}
    x = {k: v for k, v in a.to_dict().items() if k not in skip}
    y = {k: v for k, v in b.to_dict().items() if k not in skip}
    assert x == y, {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}
    return True


def test_export_to_a_family_by_name(tmp_path, capsys):
    """``--target <model_type>``: the imported family by name is what auto writes; another family is refused,
    naming the moetrain field it does not compute; a run without hf/config.json (a model moetrain trained)
    is written from the model's fields alone and loads as that class with the same logits."""
    src, run = tmp_path / "src", tmp_path / "run"
    hf, _ = hf_folder("qwen3_moe-bias-sparse_step2", src)
    cli(capsys, "import", src, run)
    cli(capsys, "export", run, tmp_path / "auto")
    cli(capsys, "export", run, tmp_path / "named", "--target", "qwen3_moe")
    for name in ("config.json", "model.safetensors.index.json"):
        assert (tmp_path / "auto" / name).read_text() == (tmp_path / "named" / name).read_text()
    code = main(["export", str(run), str(tmp_path / "olmoe"), "--target", "olmoe"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and not (tmp_path / "olmoe").exists()
    assert "export --target olmoe: moetrain config field model.qk_norm = 'head': OlmoeForCausalLM does not" in err
    (run / "hf" / "config.json").unlink()  # now a run moetrain trained: nothing imported to start from
    cli(capsys, "export", run, tmp_path / "fresh", "--target", "qwen3_moe")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fresh")
    assert type(fresh).__name__ == "Qwen3MoeForCausalLM"
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (fresh(x).logits - hf(x).logits).abs().max().item() <= 1e-5
