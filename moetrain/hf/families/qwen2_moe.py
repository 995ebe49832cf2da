"""Qwen2-MoE (``Qwen2MoeForCausalLM``, model_type ``qwen2_moe``) <-> moetrain, exactly.

Qwen2-MoE is the shared decoder (:mod:`.decoder`) with biases on the query, key and value projections
only (``qkv_bias``, ``model.qkv_bias``), no query/key norms; dense blocks where ``mlp_only_layers`` or
``decoder_sparse_step`` say so (``moe.layers``); top-k weights renormalised when ``norm_topk_prob``;
and in every MoE block one shared SwiGLU expert of width ``shared_expert_intermediate_size`` whose
output is scaled by ``sigmoid(x @ shared_expert_gate)`` (``moe.shared_experts: 1``,
``moe.shared_expert_gate``).

Checkpoint layouts (chosen from the tensor names): one tensor per expert
``model.layers.N.mlp.experts.E.gate_proj/up_proj/down_proj.weight`` (the Hub's; what
``save_pretrained`` writes and export writes) or transformers 5's fused
``mlp.experts.gate_up_proj`` / ``down_proj``; the router ``mlp.gate.weight`` in both.
"""

from __future__ import annotations

from typing import Any

import torch

from moetrain.hf.families import decoder
from moetrain.hf.families.base import TensorRule, transpose_rule
from moetrain.hf.families.decoder import Fields, refuse

MODEL_TYPES = ("qwen2_moe",)
ARCHITECTURE = "Qwen2MoeForCausalLM"
DEFAULT_THETA = 10000.0
# Qwen2MoeConfig's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": None,
    "qkv_bias": True,
    "layer_types": None,
}


def _fields(hf_config: dict) -> Fields:
    return Fields(hf_config, DEFAULTS)


def layer_types(f: Fields) -> list[str]:
    """Each layer's attention as Qwen2MoeConfig's ``__post_init__`` sets it when the file has none."""
    if f["layer_types"] is not None:
        return list(f["layer_types"])
    sliding = f["use_sliding_window"]
    return [
        "sliding_attention" if (i + 1) % 2 and i < f["max_window_layers"] and sliding else "full_attention"
        for i in range(f["num_hidden_layers"])
    ]


def check(hf_config: dict) -> None:
    f = _fields(hf_config)
    decoder.check_common(f, MODEL_TYPES, DEFAULT_THETA)
    decoder.check_head_dim_not_null(f, "Qwen2MoeAttention")
    kinds = layer_types(f)
    if set(kinds) - {"full_attention", "sliding_attention"} or len(kinds) != f["num_hidden_layers"]:
        raise refuse("layer_types", kinds, "supported: one of full_attention, sliding_attention per layer")
    if "sliding_attention" in kinds:
        if not f["use_sliding_window"]:  # transformers then sets the window to 0: no key is visible
            raise refuse("layer_types", kinds, "sliding layers with use_sliding_window false are not supported")
        decoder.check_window("sliding_window", f["sliding_window"], f)
    if f["shared_expert_intermediate_size"] < 1:
        raise refuse("shared_expert_intermediate_size", f["shared_expert_intermediate_size"], "supported: 1 or more")
    decoder.qwen_moe_blocks(f)


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = _fields(hf_config)
    attention = {"qkv_bias": bool(f["qkv_bias"]), "attn_out_bias": False, "qk_norm": "none", "clip_qkv": None}
    model = decoder.model_section(f, DEFAULT_THETA, d_ff=f["intermediate_size"], **attention)
    shared = {
        "shared_experts": 1,
        "shared_expert_hidden": f["shared_expert_intermediate_size"],
        "shared_expert_gate": True,
    }
    moe = decoder.moe_section(
        f, decoder.qwen_moe_blocks(f), f["moe_intermediate_size"], renormalize=bool(f["norm_topk_prob"]), **shared
    )
    return {"model": model, "moe": moe}


def shared_expert_rules(i: int, width: int) -> list[TensorRule]:
    """The shared expert -> moetrain's ``SharedExperts`` (``x @ w``: transposed; ``w_in_DF`` holds the
    gate columns, then the up columns) and its gate ``[1, D]`` -> ``w_gate_D1``."""
    src, dst = f"model.layers.{i}.mlp.", f"layers.{i}.ffn.shared."
    gate_up = (src + "shared_expert.gate_proj.weight", src + "shared_expert.up_proj.weight")
    w_in = TensorRule(
        dst + "w_in_DF",
        gate_up,
        lambda gate, up: torch.cat([gate.t(), up.t()], dim=1),
        lambda t: (t[:, :width].t().contiguous(), t[:, width:].t().contiguous()),
    )
    return [
        w_in,
        transpose_rule(dst + "w_out_FD", src + "shared_expert.down_proj.weight"),
        transpose_rule(dst + "w_gate_D1", src + "shared_expert_gate.weight"),
    ]


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
        out += shared_expert_rules(i, moe.shared_experts * moe.shared_expert_hidden)
    return out


def to_hf_config(hf_config: dict, model: dict, moe: dict | None) -> dict:
    m, e = decoder.sections(model, moe)
    why = decoder.common_mismatches(m, e, "Qwen2-MoE")
    if e is not None:
        why += decoder.expected_values(
            m, "model", {"attn_out_bias": False, "qk_norm": "none", "clip_qkv": None}, "Qwen2-MoE"
        )
        if not e.shared_experts or not e.shared_expert_gate:
            field, value = ("moe.shared_experts", 0) if not e.shared_experts else ("moe.shared_expert_gate", False)
            why.append(decoder.Mismatch(field, value, "Qwen2-MoE has a gated shared expert in every MoE block"))
    decoder.raise_mismatches(why, ARCHITECTURE)
    expert_width = e.expert_hidden or m.d_ff
    out = {
        **hf_config,
        **decoder.common_hf_fields(m, e, hf_config, DEFAULT_THETA),
        **decoder.qwen_block_fields(_fields(hf_config), m, e),
    }
    out.update(
        model_type="qwen2_moe",
        architectures=[ARCHITECTURE],
        **decoder.head_dim_field(hf_config, m),
        qkv_bias=m.qkv_bias,
        moe_intermediate_size=expert_width,
        shared_expert_intermediate_size=e.shared_experts * (e.shared_expert_hidden or expert_width),
        num_experts=e.num_experts,
        norm_topk_prob=e.router.renormalize,
    )
    kinds = layer_types(_fields(hf_config | {"num_hidden_layers": m.n_layers}))
    in_use = len(kinds) != m.n_layers or "sliding_attention" in kinds
    if not decoder.keeps_window(hf_config, m, in_use):
        out.update(use_sliding_window=False, layer_types=None)
    return out
