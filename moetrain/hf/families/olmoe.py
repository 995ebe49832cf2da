"""OLMoE (``OlmoeForCausalLM``, model_type ``olmoe``) <-> moetrain, exactly.

OLMoE is the shared decoder (:mod:`.decoder`) with an RMSNorm over the whole query projection and the
whole key projection before rotary positions (``model.qk_norm: full``); queries, keys and values
clamped to ``[-clip_qkv, clip_qkv]`` after those norms when ``clip_qkv`` is set (``model.clip_qkv``);
biases on q, k, v and o when ``attention_bias``; an MoE layer in every block; top-k weights
renormalised when ``norm_topk_prob``; no shared expert. Its norms are sized for a head dim of
``hidden_size / num_attention_heads``, so no other head dim exists in OLMoE.

Checkpoint layouts (chosen from the tensor names): one tensor per expert
``model.layers.N.mlp.experts.E.gate_proj/up_proj/down_proj.weight`` (the Hub's; what
``save_pretrained`` writes and export writes) or transformers 5's fused
``mlp.experts.gate_up_proj`` / ``down_proj``; the router ``mlp.gate.weight`` in both.
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import decoder
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields, Mismatch, refuse

MODEL_TYPES = ("olmoe",)
ARCHITECTURE = "OlmoeForCausalLM"
DEFAULT_THETA = 10000.0
# OlmoeConfig's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "num_experts_per_tok": 8,
    "num_experts": 64,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": False,
}
ALIASES = {"num_local_experts": "num_experts"}  # OlmoeConfig.attribute_map


def _fields(hf_config: dict) -> Fields:
    return Fields(hf_config, DEFAULTS, ALIASES)


def check(hf_config: dict) -> None:
    f = _fields(hf_config)
    decoder.check_common(f, MODEL_TYPES, DEFAULT_THETA)
    decoder.check_head_dim_not_null(f, "OlmoeAttention")
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    if hidden % heads or decoder.head_dim_of(f) != hidden // heads:
        raise refuse(
            "head_dim",
            decoder.head_dim_of(f),
            f"OlmoeAttention's q_norm spans hidden_size ({hidden}), so the heads must split it evenly: "
            f"supported: hidden_size / num_attention_heads with no remainder",
        )
    if hf_config.get("sliding_window") is not None:  # not an OlmoeConfig field; flash-attention would read it
        raise refuse("sliding_window", hf_config["sliding_window"], "OLMoE has no sliding window; supported: none")
    clip = f["clip_qkv"]
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise refuse("clip_qkv", clip, "must be a positive number or null")


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = _fields(hf_config)
    bias, clip = bool(f["attention_bias"]), f["clip_qkv"]
    attention = {"qkv_bias": bias, "attn_out_bias": bias, "qk_norm": "full", "clip_qkv": clip and float(clip)}
    model = decoder.model_section(f, DEFAULT_THETA, d_ff=f["intermediate_size"], **attention)
    blocks = list(range(f["num_hidden_layers"]))
    moe = decoder.moe_section(f, blocks, f["intermediate_size"], renormalize=bool(f["norm_topk_prob"]))
    return {"model": model, "moe": moe}


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    model, moe = decoder.sections(**to_moetrain(hf_config))
    fused = decoder.uses_fused_experts(tensor_names)
    out = decoder.backbone_rules(model.n_layers, model.tie_embeddings)
    for i in range(model.n_layers):
        out += decoder.attention_rules(i, model)
        names = ("gate_proj", "up_proj", "down_proj")
        out += decoder.expert_rules(i, f"model.layers.{i}.mlp.", names, moe.num_experts, moe.expert_hidden, fused)
    return out


def to_hf_config(hf_config: dict, model: dict, moe: dict | None) -> dict:
    m, e = decoder.sections(model, moe)
    why = decoder.common_mismatches(m, e, "OLMoE")
    if e is not None:
        why += decoder.expected_values(m, "model", {"qk_norm": "full", "attn_out_bias": m.qkv_bias}, "OLMoE")
        why += decoder.expected_values(e, "moe", {"shared_experts": 0}, "OLMoE")
        why += decoder.every_block_mismatch(m, e, "OLMoE")
        if m.head_dim is not None and m.head_dim * m.n_heads != m.d_model:
            why.append(Mismatch("model.head_dim", m.head_dim, "OLMoE's head dim is d_model / n_heads"))
    decoder.raise_mismatches(why, ARCHITECTURE)
    out = {**hf_config, **decoder.common_hf_fields(m, e, hf_config, DEFAULT_THETA)}
    out.update(
        model_type="olmoe",
        architectures=[ARCHITECTURE],
        attention_bias=m.qkv_bias,
        clip_qkv=m.clip_qkv,
        intermediate_size=e.expert_hidden or m.d_ff,
        num_experts=e.num_experts,
        norm_topk_prob=e.router.renormalize,
    )
    if "num_local_experts" in hf_config:
        out["num_local_experts"] = e.num_experts
    out.pop("head_dim", None)  # not an OlmoeConfig field: the head dim is hidden_size / num_attention_heads
    return out
