"""Qwen3-MoE (``Qwen3MoeForCausalLM``, model_type ``qwen3_moe``) <-> moetrain, exactly.

Qwen3-MoE is the shared decoder (:mod:`.decoder`) with a head dim of its own (``head_dim``, which need
not be ``hidden_size / num_attention_heads``: ``model.head_dim``); an RMSNorm over each head's dims on
queries and keys before rotary positions (``model.qk_norm: head``); biases on q, k, v and o when
``attention_bias``; dense blocks where ``mlp_only_layers`` or ``decoder_sparse_step`` say so
(``moe.layers``); top-k weights renormalised when ``norm_topk_prob``; no shared expert.

Checkpoint layouts (chosen from the tensor names): one tensor per expert
``model.layers.N.mlp.experts.E.gate_proj/up_proj/down_proj.weight`` (the Hub's; what
``save_pretrained`` writes and export writes) or transformers 5's fused
``mlp.experts.gate_up_proj`` / ``down_proj``; the router ``mlp.gate.weight`` in both.
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import decoder
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields

MODEL_TYPES = ("qwen3_moe",)
ARCHITECTURE = "Qwen3MoeForCausalLM"
DEFAULT_THETA = 10000.0
# Qwen3MoeConfig's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "num_local_experts": 128,
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": None,
}
# Qwen3MoeConfig.attribute_map: the Hub's files say num_experts, transformers 5 writes num_local_experts.
ALIASES = {"num_experts": "num_local_experts"}


def _fields(hf_config: dict) -> Fields:
    return Fields(hf_config, DEFAULTS, ALIASES)


def check(hf_config: dict) -> None:
    f = _fields(hf_config)
    decoder.check_common(f, MODEL_TYPES, DEFAULT_THETA)
    decoder.check_head_dim_not_null(f, "Qwen3MoeAttention")
    if f["use_sliding_window"] and f["sliding_window"] is not None:  # then every layer slides
        decoder.check_window("sliding_window", f["sliding_window"], f)
    decoder.qwen_moe_blocks(f)


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = _fields(hf_config)
    bias = bool(f["attention_bias"])
    attention = {"qkv_bias": bias, "attn_out_bias": bias, "qk_norm": "head", "clip_qkv": None}
    model = decoder.model_section(f, DEFAULT_THETA, d_ff=f["intermediate_size"], **attention)
    renormalize = bool(f["norm_topk_prob"])
    moe = decoder.moe_section(f, decoder.qwen_moe_blocks(f), f["moe_intermediate_size"], renormalize=renormalize)
    return {"model": model, "moe": moe}


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    model, moe = decoder.sections(**to_moetrain(hf_config))
    fused = decoder.uses_fused_experts(tensor_names)
    moe_at = set(moe.moe_blocks(model.n_layers))
    out = decoder.backbone_rules(model.n_layers, model.tie_embeddings)
    for i in range(model.n_layers):
        out += decoder.attention_rules(i, model)
        if i not in moe_at:
            out += decoder.dense_mlp_rules(i, model.d_ff)
            continue
        names = ("gate_proj", "up_proj", "down_proj")
        out += decoder.expert_rules(i, f"model.layers.{i}.mlp.", names, moe.num_experts, moe.expert_hidden, fused)
    return out


def to_hf_config(hf_config: dict, model: dict, moe: dict | None) -> dict:
    m, e = decoder.sections(model, moe)
    why = decoder.common_mismatches(m, e, "Qwen3-MoE")
    if e is not None:
        expected = {"qk_norm": "head", "clip_qkv": None, "attn_out_bias": m.qkv_bias}  # one attention_bias
        why += decoder.expected_values(m, "model", expected, "Qwen3-MoE")
        why += decoder.expected_values(e, "moe", {"shared_experts": 0}, "Qwen3-MoE")
    decoder.raise_mismatches(why, ARCHITECTURE)
    out = {
        **hf_config,
        **decoder.common_hf_fields(m, e, hf_config, DEFAULT_THETA),
        **decoder.qwen_block_fields(_fields(hf_config), m, e),
    }
    out.update(
        model_type="qwen3_moe",
        architectures=[ARCHITECTURE],
        **decoder.head_dim_field(hf_config, m),
        attention_bias=m.qkv_bias,
        moe_intermediate_size=e.expert_hidden or m.d_ff,
        num_local_experts=e.num_experts,
        num_experts=e.num_experts,  # the name transformers 4 reads
        norm_topk_prob=e.router.renormalize,
    )
    if not decoder.keeps_window(hf_config, m, bool(hf_config.get("use_sliding_window"))):
        out["use_sliding_window"] = False
    return out
