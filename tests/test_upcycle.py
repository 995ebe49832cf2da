"""``moetrain upcycle``: dense Llama / Qwen2 / Qwen3 folders as an MoE run directory.

- the dense families compute what transformers' classes compute (logits within 1e-5, fp32);
- without noise, step 0 of every method is the dense model: sparse (top-1, top-2, an MoE layer in every
  second block), granular (G = 2 and 4, one and two copies) and BTX of identical specialists give the dense
  transformers model's logits within 1e-5 (tests/test_upcycle_training.py: the same under EP 2);
- BTX of different specialists: expert i is specialist i's FFN, the rest their mean; noise is seeded;
- bad input: one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_ok
from hf_dense import DENSE, dense_folder, dense_model
from hf_runs import bpe_tokenizer
from hf_tiny import tokens

from moetrain.cli import main
from moetrain.hf.convert import load_into, state_dict_reader
from moetrain.hf.families import dense_family_for
from moetrain.hf.families.decoder import sections
from moetrain.inference.loading import load_checkpoint
from moetrain.model import MoETransformer

pytestmark = pytest.mark.timeout(300)


def max_difference(hf, ours) -> float:
    worst = 0.0
    with torch.no_grad():
        for seed in (0, 1, 2):
            x = tokens(seed)
            theirs = hf(x).logits
            assert theirs.std() > 0.5, "logits too flat for a meaningful comparison"
            worst = max(worst, (theirs - ours(x).logits).abs().max().item())
    return worst


@pytest.mark.parametrize("variant", sorted(DENSE))
def test_a_dense_family_computes_what_transformers_computes(variant):
    hf = dense_model(variant)
    config = hf.config.to_dict()
    family = dense_family_for(config["model_type"])
    ours = MoETransformer(*sections(**family.to_moetrain(config))).eval()
    load_into(ours, family.rules(config), state_dict_reader(hf.state_dict()))
    assert max_difference(hf, ours) <= 1e-5


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {v: (dense_folder(root / v, v), root / v) for v in ("llama", "qwen3-bias")}


CASES = {  # name -> (source variant, flags, SRC count)
    "sparse-top1": ("llama", ["--method", "sparse", "--num-experts", "4", "--top-k", "1"], 1),
    "sparse-top2-every2": ("llama", ["--method", "sparse", "--num-experts", "4", "--top-k", "2", "--every", "2"], 1),
    "sparse-top2-qwen3": ("qwen3-bias", ["--method", "sparse", "--num-experts", "8", "--top-k", "2"], 1),
    "granular-G2-one-copy": ("llama", ["--method", "granular", "--num-experts", "2", "--top-k", "2",
                                       "--granularity", "2"], 1),
    "granular-G4-two-copies": ("qwen3-bias", ["--method", "granular", "--num-experts", "8", "--top-k", "4",
                                              "--granularity", "4"], 1),
    "btx-3-identical": ("llama", ["--method", "btx", "--top-k", "2"], 3),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_0_of_an_upcycled_model_is_the_dense_model(case, sources, tmp_path, capsys):
    variant, flags, n = CASES[case]
    hf, src = sources[variant]
    assert main(["upcycle", *[str(src)] * n, str(tmp_path / "run"), *flags]) == 0
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.step == 0 and loaded.cfg.moe is not None
    assert max_difference(hf, loaded.model) <= 1e-5
    record = json.loads((tmp_path / "run" / "upcycle.json").read_text())
    assert record["method"] == flags[1] and len(record["sources"]) == n


def test_btx_takes_each_specialists_ffn_and_averages_the_rest(tmp_path):
    specialists = [dense_folder(tmp_path / f"s{i}", "llama", seed=i) for i in range(2)]
    folders = [str(tmp_path / f"s{i}") for i in range(2)]
    assert main(["upcycle", *folders, str(tmp_path / "run"), "--method", "btx", "--top-k", "1"]) == 0
    params = dict(load_checkpoint(tmp_path / "run").model.named_parameters())
    for i, hf in enumerate(specialists):
        mlp = hf.model.layers[1].mlp
        assert torch.equal(params["layers.1.ffn.experts.w1_SLDF"][0, i], mlp.gate_proj.weight.t())
        assert torch.equal(params["layers.1.ffn.experts.w3_SLDF"][0, i], mlp.up_proj.weight.t())
        assert torch.equal(params["layers.1.ffn.experts.w2_SLFD"][0, i], mlp.down_proj.weight.t())
    mean = (specialists[0].model.embed_tokens.weight + specialists[1].model.embed_tokens.weight) / 2
    assert torch.allclose(params["embed.weight"], mean, atol=0, rtol=0)


def test_noise_is_relative_and_seeded(sources, tmp_path):
    hf, src = sources["llama"]
    flags = ["--method", "sparse", "--num-experts", "2", "--top-k", "1", "--noise", "0.1"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(["upcycle", str(src), str(tmp_path / name), *flags, "--seed", seed]) == 0
    w = {n: dict(load_checkpoint(tmp_path / n).model.named_parameters())["layers.0.ffn.experts.w1_SLDF"]
         for n in "abc"}  # fmt: skip
    dense = hf.model.layers[0].mlp.gate_proj.weight.t()
    assert torch.equal(w["a"], w["b"]) and not torch.equal(w["a"], w["c"])
    assert not torch.equal(w["a"][0, 0], w["a"][0, 1])  # the copies differ
    relative = (w["a"][0, 0] - dense).std() / dense.std()
    assert 0.08 < relative.item() < 0.12


def _break(case: str, src, tmp_path) -> list[str]:
    """Sources and flags of a bad upcycle (``src``: a good llama folder)."""
    sparse = ["--method", "sparse", "--num-experts", "4", "--top-k", "2"]
    if case == "specialist-shapes":
        dense_folder(tmp_path / "other", "llama", intermediate_size=64)
        return [str(src), str(tmp_path / "other"), "--method", "btx", "--top-k", "1"]
    if case == "specialist-tokenizer":
        dense_folder(tmp_path / "other", "llama", seed=3)
        bpe_tokenizer(eos="<|eot|>").save_pretrained(tmp_path / "other")
        return [str(src), str(tmp_path / "other"), "--method", "btx", "--top-k", "1"]
    if case == "architecture":
        dense_folder(tmp_path / "other", "llama")
        config = json.loads((tmp_path / "other" / "config.json").read_text())
        (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
        return [str(tmp_path / "other"), *sparse]
    if case == "field":
        dense_folder(tmp_path / "other", "qwen2")
        config = json.loads((tmp_path / "other" / "config.json").read_text())
        slides = {"use_sliding_window": True, "sliding_window": 16,
                  "layer_types": ["sliding_attention", "full_attention", "full_attention"]}  # fmt: skip
        (tmp_path / "other" / "config.json").write_text(json.dumps({**config, **slides}))
        return [str(tmp_path / "other"), *sparse]
    if case == "top-k":
        return [str(src), "--method", "sparse", "--num-experts", "4", "--top-k", "5"]
    if case == "granularity":
        return [str(src), "--method", "granular", "--num-experts", "10", "--top-k", "5", "--granularity", "5"]
    assert case == "run-dir-not-empty"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    return [str(src), *sparse]


ERRORS = {
    "specialist-shapes": "model.d_ff = 64, but SRC 1",
    "specialist-tokenizer": "its tokenizer differs from SRC 1's (tokenizer.json, tokenizer_config.json)",
    "architecture": "model_type = 'mistral': not a supported dense family; supported: llama, qwen2, qwen3",
    "field": "config.json field sliding_window = 16: sliding-window attention is not supported",
    "top-k": "--top-k (5) must be between 1 and --num-experts (4)",
    "granularity": "--granularity (5) must divide the dense FFN width (intermediate_size 48)",
    "run-dir-not-empty": "already holds files",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_error_and_writes_nothing(case, sources, tmp_path, capsys):
    _, src = sources["llama"]
    args = _break(case, src, tmp_path)
    flags_at = next(i for i, a in enumerate(args) if a.startswith("--"))
    code = main(["upcycle", *args[:flags_at], str(tmp_path / "run"), *args[flags_at:]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and ERRORS[case] in err, err
    assert "Traceback" not in err
    if case == "run-dir-not-empty":
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    else:
        assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.*"))  # no temporary folder left beside it


def test_an_upcycled_model_exports_as_mixtral_which_computes_the_dense_model(sources, tmp_path):
    """Top-k of a softmax with renormalised gates, SwiGLU experts in every block: Mixtral's own MoE."""
    transformers = pytest.importorskip("transformers")
    hf, src = sources["llama"]
    assert main(["upcycle", str(src), str(tmp_path / "run"), "--method", "sparse", "--num-experts", "4",
                 "--top-k", "2"]) == 0  # fmt: skip
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "MixtralForCausalLM"
    assert max_difference(hf, exported) <= 1e-5


DENSE_RUN = ["moe=null", "model.arch=llama", "train.steps=2", "train.eval_interval=0", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_cache):
    """A moetrain run of a dense Llama-style model (byte tokenizer), trained 2 steps."""
    run = tmp_path_factory.mktemp("dense_run") / "run"
    train_ok(run, data_cache, *DENSE_RUN)
    return run


def test_a_dense_moetrain_run_upcycles_into_its_own_function(dense_run, tmp_path):
    dense = load_checkpoint(dense_run).model
    x = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(0))
    for name, srcs, flags in (("sparse", [dense_run], ["--method", "sparse", "--num-experts", "4", "--top-k", "2"]),
                              ("btx", [dense_run, dense_run], ["--method", "btx", "--top-k", "1"])):  # fmt: skip
        assert main(["upcycle", *map(str, srcs), str(tmp_path / name), *flags]) == 0
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.cfg.data.tokenizer == "byte" and not (tmp_path / name / "tokenizer").exists()
        with torch.no_grad():
            assert (dense(x).logits - loaded.model(x).logits).abs().max().item() <= 1e-5


def test_a_run_with_experts_or_another_ffn_is_refused(dense_run, tmp_path, data_cache, capsys):
    flags = ["--method", "sparse", "--num-experts", "2", "--top-k", "1"]
    assert main(["upcycle", str(dense_run), str(tmp_path / "moe"), *flags]) == 0
    capsys.readouterr()
    assert main(["upcycle", str(tmp_path / "moe"), str(tmp_path / "again"), *flags]) == 2
    assert "the run's model has experts (moe is set)" in capsys.readouterr().err
    gelu = tmp_path / "gelu"
    train_ok(gelu, data_cache, *DENSE_RUN, "model.arch=gpt2")
    assert main(["upcycle", str(gelu), str(tmp_path / "out"), *flags]) == 2
    assert "model.ffn_type = 'gelu'" in capsys.readouterr().err
    assert not (tmp_path / "again").exists() and not (tmp_path / "out").exists()


def test_a_router_override_that_breaks_step_0_is_named(sources, tmp_path, capsys):
    _, src = sources["llama"]
    flags = ["--method", "sparse", "--num-experts", "4", "--top-k", "1"]
    assert main(["upcycle", str(src), str(tmp_path / "a"), *flags, "moe.router.renormalize=false"]) == 0
    assert "NOTE: step 0 will not compute the dense model: moe.router.renormalize = False" in capsys.readouterr().out
    granular = ["--method", "granular", "--num-experts", "4", "--top-k", "2", "--granularity", "2"]
    assert main(["upcycle", str(src), str(tmp_path / "b"), *granular, "moe.router.top_k=3"]) == 2
    assert "top_k a multiple of --granularity (2)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_failure_while_writing_leaves_nothing(sources, tmp_path, capsys, monkeypatch):
    """The disk fills at the 5th tensor (as tests/test_import_errors.py): one message, exit 2, no RUN_DIR
    and no temporary folder."""
    from moetrain.checkpoint import streaming

    _, src = sources["llama"]
    write, count = streaming.SafetensorsWriter.write, []

    def failing(self, key, tensor):
        count.append(key)
        if len(count) == 5:
            raise OSError(28, "No space left on device")
        write(self, key, tensor)

    monkeypatch.setattr(streaming.SafetensorsWriter, "write", failing)
    capsys.readouterr()
    code = main(
        ["upcycle", str(src), str(tmp_path / "run"), "--method", "sparse", "--num-experts", "2", "--top-k", "1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "No space left on device" in err, err
    assert len(count) == 5 and not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.upcycle-*"))
