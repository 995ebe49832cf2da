"""Multi-head latent attention (``model.attention: mla``) vs transformers' ``DeepseekV3Attention`` with the
same weights (fp32, 1e-5): low-rank or plain queries, yarn or plain rotary positions, both
``rope_interleave`` layouts; decoding with the KV cache equals the full forward pass."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_import import dict_reader, moetrain_model, randomize  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from moetrain.backbone.kv_cache import KVCache  # noqa: E402
from moetrain.backbone.mla import mla_softmax_scale  # noqa: E402
from moetrain.config.model import ModelConfig  # noqa: E402
from moetrain.hf.families import deepseek_v3  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def dense_config(q_lora_rank, yarn: bool, interleave: bool, layers: int = 1) -> DeepseekV3Config:
    """A DeepSeek-V3 of dense blocks only: the attention is what differs."""
    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=layers,
        kv_lora_rank=12,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8,
        qk_nope_head_dim=6,
        v_head_dim=10,
        max_position_embeddings=128,
        rope_parameters=YARN if yarn else {"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=interleave,
    )


def imported(config: DeepseekV3Config, seed: int = 0):
    hf = DeepseekV3ForCausalLM(config).eval()
    randomize(hf, seed)
    hc = config.to_dict()
    sd = hf.state_dict()
    model = moetrain_model(deepseek_v3.to_moetrain(hc), deepseek_v3.rules(hc, set(sd)), dict_reader(sd))
    return hf, model


VARIANTS = [(24, True, True), (24, False, True), (None, True, True), (None, False, False), (24, True, False)]


@pytest.mark.parametrize("q_lora_rank,yarn,interleave", VARIANTS)
def test_attention_equals_deepseek_v3_attention(q_lora_rank, yarn, interleave):
    hf, model = imported(dense_config(q_lora_rank, yarn, interleave))
    x_BSD = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(17)
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(x_BSD, positions[None])
        want, _ = hf.model.layers[0].self_attn(x_BSD, (cos, sin), attention_mask=None)
        got = model.layers[0].attn(x_BSD, model.rotary(positions))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert hf.model.layers[0].self_attn.scaling == model.layers[0].attn.scale


def test_interleaved_weights_need_the_import_permutation():
    """The test above can fail: without the rotary reordering (reading interleaved weights as if they
    were not) the outputs differ."""
    config = dense_config(24, True, interleave=True)
    hf, _ = imported(config)
    hc = {**config.to_dict(), "rope_interleave": False}  # the mapping without the permutation
    sd = hf.state_dict()
    wrong = moetrain_model(deepseek_v3.to_moetrain(hc), deepseek_v3.rules(hc, set(sd)), dict_reader(sd))
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert (hf(x).logits - wrong(x).logits).abs().max() > 1e-3


def test_yarn_multiplies_the_softmax_scale_by_mscale_squared():
    cfg = ModelConfig(
        arch="llama",
        attention="mla",
        mla={"kv_lora_rank": 8, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 8},
        rope_scaling={"kind": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale_all_dim": 1.0},
    )
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0, dtype=torch.float64)).item() + 1.0
    assert mla_softmax_scale(cfg.mla, cfg.rope_scaling) == pytest.approx(32**-0.5 * mscale**2, rel=1e-12)
    assert mla_softmax_scale(cfg.mla, None) == 32**-0.5


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_cached_decoding_equals_the_full_forward(q_lora_rank):
    """Prefill 9 tokens, then 3 at once, then 1 at a time: the cache holds the latent and the rotated
    shared key, and the logits equal one pass over the whole sequence."""
    _, model = imported(dense_config(q_lora_rank, True, True, layers=2))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache(model.cfg.n_layers)
        parts = [model(tokens[:, :9], cache=cache).logits, model(tokens[:, 9:12], cache=cache).logits]
        parts += [model(tokens[:, i : i + 1], cache=cache).logits for i in range(12, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.keys[0].shape == (2, 1, 16, 12) and cache.values[0].shape == (2, 1, 16, 8)  # latent, rotary key


def test_mla_config_errors_name_the_fields():
    mla = {"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}
    with pytest.raises(ValueError, match="model.attention is mla but model.mla is null"):
        ModelConfig(arch="llama", attention="mla")
    with pytest.raises(ValueError, match="needs model.arch: llama"):
        ModelConfig(arch="gpt2", attention="mla", mla=mla)
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        ModelConfig(arch="llama", attention="mla", mla=mla, n_kv_heads=2)
    with pytest.raises(ValueError, match="qk_rope_head_dim \\(7\\) must be even"):
        ModelConfig(arch="llama", attention="mla", mla={**mla, "qk_rope_head_dim": 7})
    # the head dims are MLA's own: d_model need not divide into n_heads
    assert ModelConfig(arch="llama", d_model=30, n_heads=4, attention="mla", mla=mla).rotary_dim == 8
