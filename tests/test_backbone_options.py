"""The backbone and MoE options the Hugging Face families need, in moetrain's own configs:
``model.head_dim``, ``model.qkv_bias``, ``model.attn_out_bias``, ``model.qk_norm``, ``model.clip_qkv`` and
``moe.shared_expert_gate`` (with ``moe.layers``' dense blocks).

Their math against transformers is tests/test_hf_families.py; here: the config rules, the parameters
they create, the KV cache with every option (norms and clamp before rotary, before caching), a
checkpoint saved before they existed, and a short ``moetrain train`` run with all of them on.
tests/test_export.py checks them through the remote-code export.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import read_metrics, run_train

from moetrain.backbone.kv_cache import KVCache
from moetrain.backbone.norm import RMSNorm
from moetrain.config import load_config
from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.errors import UserError
from moetrain.model import MoETransformer

ALL_ON = {"head_dim": 12, "qkv_bias": True, "attn_out_bias": False, "clip_qkv": 1.5}


def tiny(arch: str = "llama", qk_norm: str = "head", moe: dict | None = None, **model) -> MoETransformer:
    kv_heads = 2 if arch == "llama" else None
    cfg = ModelConfig(arch=arch, vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=kv_heads, d_ff=40,
                      max_seq_len=24, qk_norm=qk_norm, **{**ALL_ON, **model})  # fmt: skip
    moe_cfg = MoEConfig(**{"num_experts": 4, "expert_type": "swiglu", "expert_hidden": 16, "shared_experts": 1,
                           "shared_expert_gate": True, "layers": [0, 2], "router": {"kind": "topk", "top_k": 2},
                           **(moe or {})})  # fmt: skip
    torch.manual_seed(0)
    m = MoETransformer(cfg, moe_cfg).eval()
    with torch.no_grad():  # norms and biases off their ones / zeros, so each one matters
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return m


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.arch=llama", "model.head_dim=7"], "model.arch llama: model.head_dim (7) must be even"),
        (["model.d_model=30", "model.n_heads=4"], "must be divisible by model.n_heads (4), or set model.head_dim"),
        (["model.qk_norm=rms"], "model.qk_norm"),
        (["model.clip_qkv=0"], "model.clip_qkv"),
        (["moe.shared_expert_gate=true"], "moe.shared_expert_gate scales the shared experts' output, but "
                                          "moe.shared_experts is 0"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_field(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, overrides)


def test_the_attention_biases_follow_model_bias_unless_set_and_config_yaml_holds_them():
    llama, gpt2 = load_config(None, ["model.arch=llama"]).model, load_config(None, []).model
    assert (llama.qkv_bias, llama.attn_out_bias, gpt2.qkv_bias, gpt2.attn_out_bias) == (False, False, True, True)
    qwen2 = load_config(None, ["model.arch=llama", "model.qkv_bias=true"]).model
    assert (qwen2.bias, qwen2.qkv_bias, qwen2.attn_out_bias) == (False, True, False)
    assert load_config(None, ["model.d_model=30", "model.n_heads=4", "model.head_dim=8"]).model.resolved_head_dim == 8
    assert load_config(None, ["model.d_model=64", "model.n_heads=4"]).model.head_dim is None  # stays null: follows


@pytest.mark.parametrize("qk_norm, q_size, k_size", [("head", 12, 12), ("full", 4 * 12, 2 * 12)])
def test_the_options_create_their_parameters(qk_norm, q_size, k_size):
    m = tiny(qk_norm=qk_norm)
    attn, names = m.layers[0].attn, dict(m.named_parameters())
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 12, 32) and attn.proj.weight.shape == (32, 4 * 12)
    assert attn.qkv.bias is not None and attn.proj.bias is None
    assert isinstance(attn.q_norm, RMSNorm) and (attn.q_norm.weight.numel(), attn.k_norm.weight.numel()) == (
        q_size,
        k_size,
    )
    assert names["layers.0.ffn.shared.w_gate_D1"].shape == (32, 1) and "layers.1.ffn.up.weight" in names
    no_shared = {"shared_experts": 0, "shared_expert_gate": False}
    plain = tiny(qk_norm="none", head_dim=None, qkv_bias=None, attn_out_bias=None, clip_qkv=None, moe=no_shared)
    assert not [n for n in dict(plain.named_parameters()) if "norm" in n and ".attn." in n or "w_gate" in n]


@pytest.mark.parametrize("arch, qk_norm", [("llama", "head"), ("llama", "full"), ("gpt2", "full")])
def test_decoding_with_the_kv_cache_equals_the_full_forward(arch, qk_norm):
    """Prefill 5 tokens, then 3 at once, then one at a time: every position's logits equal one forward
    over the whole sequence, with q/k norms, the clamp, biases, a head dim of its own and a gated
    shared expert (the cache holds keys normalised, clamped and rotated once)."""
    m = tiny(arch, qk_norm)
    x = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(x).logits
        cache = KVCache(m.cfg.n_layers)
        pieces = [m(x[:, :5], cache=cache).logits, m(x[:, 5:8], cache=cache).logits]
        pieces += [m(x[:, i : i + 1], cache=cache).logits for i in range(8, 14)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert full.std() > 0.1


def test_the_clamp_and_the_norms_act():
    """Each option changes the function (the cache test could pass with an option that does nothing)."""
    x = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    m = tiny()
    with torch.no_grad():
        base = m(x).logits
        for attn in (b.attn for b in m.layers):
            attn.clip_qkv = None
        unclamped = m(x).logits
        m.layers[1].attn.k_norm.weight.fill_(1.0)
        renormed = m(x).logits
    assert (base - unclamped).abs().max() > 1e-3 and (unclamped - renormed).abs().max() > 1e-3


def test_a_checkpoint_saved_before_the_options_resumes_without_a_difference():
    from moetrain.training.resume_checks import check_resume

    cfg = load_config(None, ["model.arch=llama", "model.vocab_size=300"])
    saved = cfg.model_dump(mode="json")
    for key in ("head_dim", "qkv_bias", "attn_out_bias", "qk_norm", "clip_qkv"):
        del saved["model"][key]
    del saved["moe"]["shared_expert_gate"]
    assert check_resume("ckpt", {"config": saved, "world_size": 1}, cfg, 1) == []
    saved["model"]["qkv_bias"] = True
    with pytest.raises(UserError, match=re.escape("model.qkv_bias: True -> False")):
        check_resume("ckpt", {"config": saved, "world_size": 1}, cfg, 1)


@pytest.mark.timeout(300)
def test_moetrain_trains_with_every_option_on(tmp_path, data_cache):
    options = ["model.arch=llama", "model.n_kv_heads=1", "model.head_dim=12", "model.qk_norm=head",
               "model.qkv_bias=true", "model.clip_qkv=8.0", "moe.placement=replace_ffn", "moe.expert_type=swiglu",
               "moe.router.kind=topk", "moe.router.top_k=2", "moe.shared_experts=1", "moe.shared_expert_gate=true",
               "moe.layers=[1]", "train.steps=4", "train.eval_interval=0", "optim.warmup_steps=1"]  # fmt: skip
    proc = run_train(tmp_path / "run", data_cache, *options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert losses[4] < losses[1]
