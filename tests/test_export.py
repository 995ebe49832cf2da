"""``moetrain export --format hf``: train tiny models through the CLI, export them, load them with
transformers, and compare logits with moetrain's own (fp32, max abs difference <= 1e-4).

- llama + top-k softmax router with renormalised gates + SwiGLU experts in every block -> native
  ``MixtralForCausalLM``; everything else -> ``modeling_moetrain.py`` through ``trust_remote_code``,
  loaded once in a process where moetrain cannot be imported;
- a checkpoint saved under expert parallelism (2 processes) exports the same files as one process;
- bad input: a target the model's math does not match, an unwritable or non-empty output folder, a
  run without a committed checkpoint -> one message, exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, clean_env, run_cli, run_train
from safetensors import safe_open

from moetrain.config import load_config
from moetrain.export.mixtral import mismatches
from moetrain.inference.loading import load_checkpoint
from moetrain.inference.text import run_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)

LLAMA = ["model.arch=llama", "model.ffn_type=swiglu", "moe.expert_type=swiglu", "model.n_kv_heads=1",
         "moe.placement=replace_ffn", "moe.router.kind=topk"]  # fmt: skip
MIXTRAL = [*LLAMA, "moe.router.top_k=2", "moe.router.renormalize=true", "model.tie_embeddings=false"]
REMOTE = {  # every kind of model MixtralForCausalLM cannot compute
    "gpt2-stablemoe-insert-stacked-stage2": ["moe.router.stage1_steps=1"],  # tiny.yaml's model
    "gpt2-hash-topk-every2-capacity": ["moe.placement=replace_ffn", "moe.expert_type=gelu", "moe.router.kind=hash",
                                       "moe.every=2", "moe.capacity_factor=1.0"],
    "gpt2-topk2-capacity": ["moe.placement=replace_ffn", "moe.expert_type=swiglu", "moe.router.kind=topk",
                            "moe.router.top_k=2", "moe.capacity_factor=1.0"],
    "llama-base-insert": [*LLAMA, "moe.router.kind=base", "moe.placement=insert", "moe.insert_after=[0,1]"],
    "llama-topk1-sigmoid-tied": [*LLAMA, "moe.router.score_func=sigmoid", "moe.every=2"],
    "llama-dense-embed-scale": [*LLAMA[:4], "moe=null", "model.embed_scale=sqrt_d"],
    "llama-deepseek-auxfree-shared-null": [*LLAMA, "moe.router.top_k=3", "moe.router.bias_update_rate=0.05",
                                           "moe.shared_experts=1", "moe.null_experts=2"],
    "llama-deepseek-mla-yarn-groups": [  # DeepSeek-V3's attention, rotary scaling and routing, as trained here
        "model.arch=llama", "moe.placement=replace_ffn", "moe.expert_type=swiglu", "model.attention=mla",
        "model.mla={q_lora_rank: 16, kv_lora_rank: 12, qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 8}",
        "model.rope_scaling={kind: yarn, factor: 4, original_max_position_embeddings: 16, mscale_all_dim: 1}",
        "moe.layers=[1]", "moe.shared_experts=1",
        "moe.router={kind: topk, top_k: 2, score_func: sigmoid, renormalize: true, num_groups: 2, topk_groups: 1, "
        "gate_scale: 2.5, correction_bias: true, bias_update_rate: 0.05, load_balance_coeff: 0}"],
    "llama-rope-llama3-linear-q": [*LLAMA, "model.attention=mla", "model.n_kv_heads=null",
        "model.mla={kv_lora_rank: 12, qk_nope_head_dim: 4, qk_rope_head_dim: 8, v_head_dim: 8}",
        "model.rope_scaling={kind: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
        "original_max_position_embeddings: 8}"],
    "gpt2-expert-choice": ["moe.placement=replace_ffn", "moe.expert_type=gelu",
                           "moe.router={kind: expert_choice, top_k: 2}"],
    "gpt2-pr-moe": ["moe.placement=replace_ffn", "moe.expert_type=gelu", "moe.router.kind=topk",
                    "moe.residual=true", "moe.num_experts_per_layer=[2, 4]"],
    # the Hugging Face families' options: Qwen3-MoE's per-head q/k norm and head dim, Qwen2-MoE's q/k/v
    # biases and gated shared expert with dense blocks; OLMoE's whole-projection norm and clamp (on gpt2:
    # LayerNorms, learned positions)
    "llama-qk-head-qkv-bias-gated-shared-dense": [*LLAMA, "model.head_dim=8", "model.qk_norm=head",
        "model.qkv_bias=true", "moe.router.top_k=2", "moe.shared_experts=1", "moe.shared_expert_gate=true",
        "moe.layers=[1]"],
    "gpt2-qk-full-clip-out-bias": ["moe.placement=replace_ffn", "moe.expert_type=gelu", "moe.router.kind=topk",
        "model.qk_norm=full", "model.clip_qkv=1.0", "model.qkv_bias=false", "model.attn_out_bias=true"],
}  # fmt: skip


def trained(run_dir, data_cache, *overrides, nproc=1):
    proc = run_train(
        run_dir, data_cache, "train.steps=3", "train.eval_interval=0", *overrides, nproc=nproc, timeout=500
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def export(run_dir, out, *args):
    proc = run_cli("export", str(run_dir), str(out), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 32), generator=torch.Generator().manual_seed(0))


def moetrain_logits(run_dir) -> torch.Tensor:
    loaded = load_checkpoint(run_dir)
    with torch.no_grad():
        return loaded.model(tokens(loaded.cfg.model.vocab_size)).logits


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory, data_cache):
    return trained(tmp_path_factory.mktemp("mixtral") / "run", data_cache, *MIXTRAL)


def test_llama_topk_softmax_swiglu_exports_as_native_mixtral(mixtral_run, tmp_path):
    out = tmp_path / "hf"
    proc = export(mixtral_run, out, "--max-shard-size", "60KB")
    assert "MixtralForCausalLM" in proc.stdout and "trust_remote_code" not in proc.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert not (out / "modeling_moetrain.py").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        theirs = model(tokens(257)).logits
    ours = moetrain_logits(mixtral_run)
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert ours.std() > 0.01  # a real comparison: logits that vary
    # a wrong expert order would show: swap two experts of layer 0 and the logits move
    with torch.no_grad():
        experts = model.model.layers[0].mlp.experts
        experts.down_proj[[0, 1]] = experts.down_proj[[1, 0]].clone()
        assert (model(tokens(257)).logits - ours).abs().max().item() > 1e-3


def test_the_exported_byte_tokenizer_matches_moetrains(mixtral_run, tmp_path):
    out = tmp_path / "hf"
    export(mixtral_run, out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    loaded = load_checkpoint(mixtral_run)
    ours = run_tokenizer(loaded.cfg.data, None)
    text = "héllo wörld ✓\n\tdef f(): return 1"
    assert hf(text)["input_ids"] == ours.encode(text) and hf.decode(ours.encode(text)) == text
    assert hf.eos_token_id == ours.eos_id == 256
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256


REMOTE_SCRIPT = """
import sys
sys.modules["moetrain"] = None  # the exported folder must load without moetrain
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
x = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    save_file({"logits": model(x).logits, "kind": torch.tensor([type(model).__name__ == "MoetrainForCausalLM"])}, sys.argv[2])
"""


@pytest.mark.parametrize("case", list(REMOTE))
def test_other_models_export_as_remote_code_loadable_without_moetrain(case, tmp_path, data_cache):
    run = trained(tmp_path / "run", data_cache, *REMOTE[case])
    out = tmp_path / "hf"
    proc = export(run, out)
    assert "not MixtralForCausalLM because:" in proc.stdout and "trust_remote_code=True" in proc.stdout
    assert (out / "modeling_moetrain.py").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moetrain.MoetrainForCausalLM"
    result = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(out), str(result)], check=True, cwd=tmp_path,
                   env={k: v for k, v in clean_env().items() if k != "PYTHONPATH"}, timeout=300)  # fmt: skip
    with safe_open(str(result), framework="pt") as f:
        theirs, is_remote = f.get_tensor("logits"), bool(f.get_tensor("kind"))
    ours = moetrain_logits(run)
    assert is_remote and ours.std() > 0.01
    assert (theirs - ours).abs().max().item() <= 1e-4, (theirs - ours).abs().max().item()


@pytest.mark.multiproc
def test_an_expert_parallel_checkpoint_exports_the_same_files_as_one_process(tmp_path, data_cache):
    one = trained(tmp_path / "ws1", data_cache, *MIXTRAL, "train.micro_batch_size=4")
    two = trained(tmp_path / "ws2", data_cache, *MIXTRAL, "train.micro_batch_size=2", "moe.expert_parallel_size=2",
                  nproc=2)  # fmt: skip
    assert len(list((two / "checkpoints" / "step_000003").glob("experts_*.safetensors"))) == 2
    export(one, tmp_path / "hf1")
    export(two, tmp_path / "hf2")
    files = sorted(p.name for p in (tmp_path / "hf1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "hf2").iterdir())
    for name in files:
        if not name.endswith(".safetensors"):
            assert (tmp_path / "hf1" / name).read_text() == (tmp_path / "hf2" / name).read_text(), name
    shard = "model-00001-of-00001.safetensors"
    with safe_open(str(tmp_path / "hf1" / shard), "pt") as a, safe_open(str(tmp_path / "hf2" / shard), "pt") as b:
        assert list(a.keys()) == list(b.keys())
        for key in a.keys():  # same training on 1 or 2 processes: equal to fp32 reduction order
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-4, atol=1e-6)
    # and exactly the weights each expert-parallel rank saved for its experts (experts 2, 3 on rank 1)
    with safe_open(str(two / "checkpoints" / "step_000003" / "experts_00001.safetensors"), "pt") as saved:
        w1 = saved.get_tensor("value/layers.0.ffn.experts.w1_SLDF/3")
    with safe_open(str(tmp_path / "hf2" / shard), "pt") as b:
        assert torch.equal(b.get_tensor("model.layers.0.block_sparse_moe.experts.3.w1.weight"), w1[0].t())


def test_export_writes_the_files_without_transformers(mixtral_run, tmp_path):
    code = "import sys; sys.modules['transformers'] = None; from moetrain.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", code, "export", str(mixtral_run), str(out), "--target", "remote-code"],
                          capture_output=True, text=True, cwd=REPO, env=clean_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "modeling_moetrain.py", "tokenizer.json", "model.safetensors.index.json"} <= {
        p.name for p in out.iterdir()
    }


def test_a_target_the_model_does_not_match_is_refused_with_the_alternative(tmp_path, data_cache):
    run = trained(tmp_path / "run", data_cache)  # tiny.yaml: gpt2, StableMoE, inserted stacked experts
    proc = run_cli("export", str(run), str(tmp_path / "hf"), "--target", "mixtral")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    for part in ("MixtralForCausalLM does not compute this model", "model.arch is gpt2", "moe.router.kind is stablemoe",
                 "inserted MoE layers", "--target remote-code", "trust_remote_code=True"):  # fmt: skip
        assert part in proc.stderr, part
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_mixtral_mismatches_name_each_difference():
    assert mismatches(load_config(None, MIXTRAL).model, load_config(None, MIXTRAL).moe) == []
    for extra, reason in [
        ("model.embed_scale=sqrt_d", "model.embed_scale is sqrt_d"),
        ("moe.router.renormalize=false", "moe.router.renormalize is false"),
        ("moe.capacity_factor=1.25", "moe.capacity_factor is 1.25"),
        ("moe.every=2", "MoE layers in some blocks only (blocks [1, 3])"),
        ("model.rope_scaling={kind: linear, factor: 2}", "model.rope_scaling is linear"),
        ("moe.router.correction_bias=true", "moe.router.correction_bias is true"),
        ("moe.router.num_groups=2", "moe.router.num_groups is 2"),
        ("moe.router.gate_scale=2.5", "moe.router.gate_scale is 2.5"),
        ("moe.expert_type=gelu", "moe.expert_type is gelu"),
        ("moe.router.score_func=sigmoid", "moe.router.score_func is sigmoid"),
        ("model.qkv_bias=true", "model.qkv_bias is true"),
        ("model.qk_norm=head", "model.qk_norm is head"),
        ("model.clip_qkv=2.0", "model.clip_qkv is 2.0"),
    ]:
        cfg = load_config(None, [*MIXTRAL, extra])
        assert [w for w in mismatches(cfg.model, cfg.moe) if w.startswith(reason)], extra


@pytest.mark.parametrize(
    "setup, message",
    [
        ("file", "OUT_DIR: cannot write"),
        ("under_file", "OUT_DIR: cannot write"),
        ("non_empty", "already holds files"),
        ("no_checkpoint", "holds no committed checkpoint"),
    ],
)
def test_bad_output_folders_and_runs_are_refused(setup, message, mixtral_run, tmp_path):
    run, out = mixtral_run, tmp_path / "hf"
    if setup == "file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "hf"
    elif setup == "under_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "a" / "b"
    elif setup == "non_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        run = tmp_path / "empty_run"
        run.mkdir()
    proc = run_cli("export", str(run), str(out))
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    if setup == "non_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
