"""The Llama-style backbone (``model.arch: llama``): its config rules, its math, the KV cache, and
training with every router, both placements, expert parallelism, ZeRO and resume.

The math is checked against plain formulas here; tests/test_export.py also checks it against
Hugging Face's ``MixtralForCausalLM`` (the reference implementation) where transformers is installed.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import read_metrics, run_train

from moetrain.backbone.attention import Rotary, apply_rotary
from moetrain.backbone.kv_cache import KVCache
from moetrain.backbone.norm import RMSNorm
from moetrain.config import load_config
from moetrain.config.loading import dump_config
from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.errors import UserError
from moetrain.model import MoETransformer

LLAMA = ["model.arch=llama", "model.n_heads=4"]


def tiny_model(arch: str = "llama", moe: dict | None = None, **model) -> MoETransformer:
    cfg = ModelConfig(arch=arch, vocab_size=61, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=24, **model)
    moe_cfg = MoEConfig(**{"num_experts": 4, "expert_type": "swiglu", "expert_hidden": 16, **(moe or {})})
    torch.manual_seed(0)
    return MoETransformer(cfg, moe_cfg).eval()


# --- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_kv_heads=2"], "model.n_kv_heads (grouped-query attention) needs model.arch: llama"),
        ([*LLAMA, "model.n_kv_heads=3"], "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
        ([*LLAMA, "model.d_model=12", "model.n_heads=4"], "head dim d_model / n_heads (3) must be even"),
    ],
)
def test_bad_llama_configs_are_refused_naming_the_fields(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_the_backbone_defaults_follow_the_arch_and_the_saved_config_holds_them(tmp_path):
    """``model.arch=llama`` alone is a Llama backbone (no ``ffn_type`` needed): RMSNorm, no biases, SwiGLU
    dense FFN and experts; an explicit value overrides a default; the dumped config holds the resolved
    values and loads back to the same config."""
    cfg = load_config(None, ["model.arch=llama"])
    assert (cfg.model.ffn_type, cfg.model.norm, cfg.model.bias, cfg.moe.expert_type) == (
        "swiglu",
        "rmsnorm",
        False,
        "swiglu",
    )
    gpt2 = load_config(None, [])
    assert (gpt2.model.ffn_type, gpt2.model.norm, gpt2.model.bias, gpt2.moe.expert_type) == (
        "gelu",
        "layernorm",
        True,
        "gelu",
    )
    mixed = load_config(None, ["model.arch=llama", "model.bias=true", "model.norm=layernorm", "moe.expert_type=gelu"])
    assert (mixed.model.ffn_type, mixed.model.norm, mixed.model.bias, mixed.moe.expert_type) == (
        "swiglu",
        "layernorm",
        True,
        "gelu",
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    text = saved.read_text()
    assert "ffn_type: swiglu" in text and "norm: rmsnorm" in text and "bias: false" in text
    assert load_config(str(saved), []) == cfg
    m = MoETransformer(mixed.model.model_copy(update={"vocab_size": 61}), mixed.moe)
    assert m.layers[0].attn.qkv.bias is not None and isinstance(m.layers[0].ln1, torch.nn.LayerNorm)
    assert m.layers[0].ffn.experts.kind == "gelu"


def test_llama_has_no_biases_no_learned_positions_and_rms_norms():
    m = tiny_model(n_kv_heads=2, tie_embeddings=False)
    names = [n for n, _ in m.named_parameters()]
    assert not [n for n in names if n.endswith(".bias")] and "pos.weight" not in names
    assert all(isinstance(mod, RMSNorm) for n, mod in m.named_modules() if n.endswith(("ln1", "ln2", "ln_f")))
    assert m.lm_head.weight is not m.embed.weight  # untied
    assert m.layers[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # 4 query heads, 2 key/value heads of dim 8


# --- math against plain formulas -----------------------------------------------------------------------


def test_rms_norm_is_the_formula():
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_rotary_pairs_dim_i_with_i_plus_half_and_rotates_by_position_times_frequency():
    A, theta = 8, 10000.0
    cos, sin = Rotary(A, theta)(torch.arange(5))
    x = torch.randn(1, 1, 5, A)
    y = apply_rotary(x, cos, sin)
    for pos in range(5):
        for i in range(A // 2):
            angle = pos * theta ** (-2 * i / A)
            a, b = x[0, 0, pos, i], x[0, 0, pos, i + A // 2]
            want = (a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle))
            torch.testing.assert_close(y[0, 0, pos, [i, i + A // 2]], torch.stack(want), rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads():
    """A GQA model equals the same model with each key/value head copied to the query heads that read it."""
    gqa = tiny_model(n_kv_heads=2, moe=None)
    full = tiny_model(n_kv_heads=4, moe=None)
    full.load_state_dict({k: v for k, v in gqa.state_dict().items() if ".attn.qkv." not in k}, strict=False)
    A = 8
    for lg, lf in zip(gqa.layers, full.layers):
        w = lg.attn.qkv.weight.detach()  # [q: 4 heads; k: 2 heads; v: 2 heads] x D
        q, k, v = w.split([4 * A, 2 * A, 2 * A])
        rep = lambda t: t.view(2, A, -1).repeat_interleave(2, dim=0).reshape(4 * A, -1)  # noqa: E731
        with torch.no_grad():
            lf.attn.qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
    x = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(gqa(x).logits, full(x).logits, rtol=1e-5, atol=1e-5)


ROUTERS = [
    ({"router": {"kind": "topk", "top_k": 2, "renormalize": True}}, "llama"),
    ({"router": {"kind": "topk", "top_k": 1}, "capacity_factor": None}, "gpt2"),
    ({"router": {"kind": "stablemoe"}, "placement": "insert", "expert_type": "stacked"}, "llama"),
    ({"router": {"kind": "stablemoe"}, "placement": "insert", "expert_type": "stacked"}, "gpt2"),
    ({"router": {"kind": "hash"}, "expert_type": "gelu"}, "llama"),
    ({"router": {"kind": "base"}, "placement": "insert", "insert_after": [0, 2]}, "llama"),
]


@pytest.mark.parametrize("moe, arch", ROUTERS, ids=[f"{m['router']['kind']}-{a}" for m, a in ROUTERS])
def test_decoding_with_the_kv_cache_equals_the_full_forward(moe, arch):
    """Prefill 5 tokens, then 3 at once, then one at a time: every position's logits equal one forward
    over the whole sequence (each MoE layer routes each new token as in the full pass)."""
    m = tiny_model(arch, moe=moe, **({"n_kv_heads": 2} if arch == "llama" else {}))
    x = torch.randint(0, 61, (2, 14))
    full = m(x).logits
    cache = KVCache(m.cfg.n_layers)
    pieces = [m(x[:, :5], cache=cache).logits, m(x[:, 5:8], cache=cache).logits]
    pieces += [m(x[:, i : i + 1], cache=cache).logits for i in range(8, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_cache_really_holds_the_context():
    """Decoding a token with the cache of another prefix gives other logits (the test above could
    otherwise pass with a cache that is ignored)."""
    m = tiny_model()
    a, b = KVCache(3), KVCache(3)
    m(torch.tensor([[1, 2, 3, 4]]), cache=a)
    m(torch.tensor([[9, 8, 7, 6]]), cache=b)
    nxt = torch.tensor([[5]])
    assert (m(nxt, cache=a).logits - m(nxt, cache=b).logits).abs().max() > 1e-3


# --- training through the CLI ----------------------------------------------------------------------

SMALL = [*LLAMA, "model.n_kv_heads=2", "model.tie_embeddings=false", "train.eval_interval=0"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


CLI_CASES = {
    "topk2-replace": ["moe.router.kind=topk", "moe.router.top_k=2", "moe.router.renormalize=true"],
    "stablemoe-insert-stacked": ["moe.router.kind=stablemoe", "moe.placement=insert", "moe.expert_type=stacked",
                                 "moe.router.stage1_steps=2"],
    "hash-every2": ["moe.router.kind=hash", "moe.every=2"],
    "base-insert": ["moe.router.kind=base", "moe.placement=insert"],
    "dense": ["moe=null"],
}  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_llama_trains_with_every_router_and_placement(case, tmp_path, data_cache):
    proc = run_train(tmp_path / "run", data_cache, *SMALL, *CLI_CASES[case], "train.steps=4", "optim.warmup_steps=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    assert got[4] < got[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    ref = tmp_path_factory.mktemp("llama_reference")
    proc = run_train(ref, data_cache, *SMALL, *CLI_CASES["topk2-replace"], "train.steps=4", "train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(ref)


LAYOUTS = {  # (world, ep, zero) before -> after the stop at step 2; the global batch stays 4 sequences
    "ws2-ep2-zero1 -> ws1": ((2, 2, 1), (1, 1, 0)),
    "ws2-ep2-zero2 -> ws2-ep1-zero0": ((2, 2, 2), (2, 1, 0)),
}


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_llama_under_expert_parallelism_zero_and_resume_equals_one_process(case, tmp_path, data_cache, reference):
    """Stop at step 2 in one layout, resume to step 4 in another: every step's loss equals the single-
    process run's (fp32, 1e-5 relative), so EP, ZeRO, checkpoints and resharding all hold for llama."""
    run = tmp_path / "run"
    for (world, ep, zero), extra in zip(LAYOUTS[case], (["train.stop_at_step=2"], [])):
        layout = [f"train.micro_batch_size={4 // world}", f"moe.expert_parallel_size={ep}",
                  f"deepspeed.zero_optimization.stage={zero}"]  # fmt: skip
        proc = run_train(run, data_cache, *SMALL, *CLI_CASES["topk2-replace"], "train.steps=4", *layout, *extra,
                         nproc=world, timeout=500)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step, want in reference.items():
        assert abs(got[step] - want) <= 1e-5 * abs(want), (step, got[step], want)


def test_a_checkpoint_saved_before_the_arch_defaults_resumes_without_a_difference():
    """A config dumped before ``model.norm`` / ``model.bias`` existed (an older release) has neither key;
    resuming it under the same job must not report them as changed."""
    from moetrain.training.resume_checks import check_resume

    cfg = load_config(None, ["model.arch=llama", "model.vocab_size=300"])
    saved = cfg.model_dump(mode="json")
    del saved["model"]["norm"], saved["model"]["bias"]
    assert check_resume("ckpt", {"config": saved, "world_size": 1}, cfg, 1) == []
    saved["model"]["bias"] = True  # a real difference is still refused
    with pytest.raises(UserError, match=r"model.bias: True -> False"):
        check_resume("ckpt", {"config": saved, "world_size": 1}, cfg, 1)


def test_moe_layers_names_the_moe_blocks_and_the_rest_stay_dense():
    cfg = load_config(None, ["model.arch=llama", "model.n_layers=4", "moe.layers=[1, 3]", "model.vocab_size=61"])
    m = MoETransformer(cfg.model, cfg.moe)
    kinds = [type(layer.ffn).__name__ for layer in m.layers]
    assert kinds == ["DenseFFN", "MoELayer", "DenseFFN", "MoELayer"]
    for bad, message in [
        ("moe.layers=[4]", "moe.layers ([4]) holds 4, outside the blocks 0..3"),
        ("moe.layers=[]", "must name at least one block"),
        ("moe.layers=[1, 1]", "must name at least one block, each once"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(None, ["model.n_layers=4", bad])
