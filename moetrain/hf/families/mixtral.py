"""Mixtral (``MixtralForCausalLM``, model_type ``mixtral``) <-> moetrain, exactly.

Mixtral is the shared decoder (:mod:`.decoder`) with no biases and no query/key norms, an MoE layer
in every block, and top-k weights always renormalised to sum to 1 (``moe.router.renormalize``).

Checkpoint layouts (chosen from the tensor names): the Hub's, which transformers' ``save_pretrained``
also writes, one tensor per expert ``model.layers.N.block_sparse_moe.experts.E.w1/w3/w2.weight`` (gate,
up, down) with the router ``block_sparse_moe.gate.weight``; and transformers 5's in-memory layout
(``save_pretrained(save_original_format=False)``) ``model.layers.N.mlp.experts.gate_up_proj`` /
``down_proj`` with ``mlp.gate.weight``. Export writes the first, which every transformers version loads.
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import decoder
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields, refuse

MODEL_TYPES = ("mixtral",)
ARCHITECTURE = "MixtralForCausalLM"
DEFAULT_THETA = 1e6  # MixtralConfig.default_theta
# MixtralConfig's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
}
ALIASES = {"num_experts": "num_local_experts"}  # MixtralConfig.attribute_map


def _fields(hf_config: dict) -> Fields:
    return Fields(hf_config, DEFAULTS, ALIASES)


def check(hf_config: dict) -> None:
    f = _fields(hf_config)
    decoder.check_common(f, MODEL_TYPES, DEFAULT_THETA)
    if f["router_jitter_noise"]:
        raise refuse(
            "router_jitter_noise",
            f["router_jitter_noise"],
            "training-time noise on the MoE input, which moetrain does not have; supported: 0.0",
        )
    if f["sliding_window"] is not None:  # MixtralModel then slides every layer's window
        decoder.check_window("sliding_window", f["sliding_window"], f)


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = _fields(hf_config)
    no_extras = {"qkv_bias": False, "attn_out_bias": False, "qk_norm": "none", "clip_qkv": None}
    model = decoder.model_section(f, DEFAULT_THETA, d_ff=f["intermediate_size"], **no_extras)
    blocks = list(range(f["num_hidden_layers"]))
    return {"model": model, "moe": decoder.moe_section(f, blocks, f["intermediate_size"], renormalize=True)}


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    model, moe = decoder.sections(**to_moetrain(hf_config))
    fused = decoder.uses_fused_experts(tensor_names)
    out = decoder.backbone_rules(model.n_layers, model.tie_embeddings)
    for i in range(model.n_layers):
        out += decoder.attention_rules(i, model)
        src = f"model.layers.{i}." + ("mlp." if fused else "block_sparse_moe.")
        width = moe.expert_hidden or model.d_ff
        out += decoder.expert_rules(i, src, ("w1", "w3", "w2"), moe.num_experts, width, fused)
    return out


def to_hf_config(hf_config: dict, model: dict, moe: dict | None) -> dict:
    m, e = decoder.sections(model, moe)
    why = decoder.common_mismatches(m, e, "Mixtral")
    if e is not None:
        no_extras = {"qkv_bias": False, "attn_out_bias": False, "qk_norm": "none", "clip_qkv": None}
        why += decoder.expected_values(m, "model", no_extras, "Mixtral")
        why += decoder.expected_values(e, "moe", {"shared_experts": 0, "router.renormalize": True}, "Mixtral")
        why += decoder.every_block_mismatch(m, e, "Mixtral")
    decoder.raise_mismatches(why, ARCHITECTURE)
    out = {**hf_config, **decoder.common_hf_fields(m, e, hf_config, DEFAULT_THETA)}
    out.update(
        model_type="mixtral",
        architectures=[ARCHITECTURE],
        **decoder.head_dim_field(hf_config, m),
        intermediate_size=e.expert_hidden or m.d_ff,
        num_local_experts=e.num_experts,
        router_jitter_noise=0.0,
    )
    if not decoder.keeps_window(hf_config, m, hf_config.get("sliding_window") is not None):
        out["sliding_window"] = None
    if "num_experts" in hf_config:
        out["num_experts"] = e.num_experts
    return out
