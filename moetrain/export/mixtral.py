"""When a model trained in moetrain is ``MixtralForCausalLM``: what ``--target auto`` checks.

Mixtral computes, per block: ``h += o_proj(attn(RMSNorm(h)))`` with rotary positions (``rotate_half``)
and grouped-query attention; ``h += sum_k w_k * Expert_k(RMSNorm(h))`` where the router takes the top
k of ``softmax(x W^T)`` and renormalises the k weights to sum to 1, and every expert is
``w2 (silu(w1 x) * w3 x)``, dropless, in every block. :func:`mismatches` lists what of a moetrain model
differs from that. The files are written through the Mixtral family mapping (``moetrain/export/family.py``,
``moetrain/hf/families/mixtral.py``), in Mixtral's original layout (``block_sparse_moe.experts.N.w1`` ...),
which every transformers version since Mixtral's release loads.
"""

from __future__ import annotations

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.config.routers import TopKRouterConfig


def mismatches(model: ModelConfig, moe: MoEConfig | None) -> list[str]:
    """Why ``MixtralForCausalLM`` cannot compute this model (empty: it can, exactly)."""
    why = []
    if model.arch != "llama":
        why.append(f"model.arch is {model.arch} (Mixtral is the llama backbone: rotary positions)")
    if model.norm != "rmsnorm":
        why.append(f"model.norm is {model.norm} (Mixtral: RMSNorm)")
    for name in ("bias", "qkv_bias", "attn_out_bias"):
        if getattr(model, name):
            why.append(f"model.{name} is true (Mixtral has no biases)")
    if model.qk_norm != "none":
        why.append(f"model.qk_norm is {model.qk_norm} (Mixtral does not normalise queries and keys)")
    if model.clip_qkv is not None:
        why.append(f"model.clip_qkv is {model.clip_qkv} (Mixtral does not clamp queries, keys and values)")
    if model.embed_scale != "none":
        why.append(f"model.embed_scale is {model.embed_scale} (Mixtral does not scale its token embeddings)")
    if model.attention != "mha":
        why.append(f"model.attention is {model.attention} (Mixtral: grouped-query multi-head attention)")
    if model.rope_scaling is not None:
        why.append(
            f"model.rope_scaling is {model.rope_scaling.kind} (the Mixtral export writes plain rotary positions)"
        )
    if moe is None:
        return [*why, "moe is null (a dense model; Mixtral has experts in every block)"]
    if moe.placement != "replace_ffn" or moe.moe_blocks(model.n_layers) != list(range(model.n_layers)):
        where = (
            "inserted MoE layers"
            if moe.placement == "insert"
            else f"MoE layers in some blocks only (blocks {moe.moe_blocks(model.n_layers)})"
        )
        why.append(f"{where} (Mixtral's experts replace the FFN of every block)")
    if moe.expert_type != "swiglu":
        why.append(f"moe.expert_type is {moe.expert_type} (Mixtral's experts are SwiGLU)")
    if moe.capacity_factor is not None:
        why.append(f"moe.capacity_factor is {moe.capacity_factor} (Mixtral is dropless)")
    if moe.shared_experts:
        why.append(f"moe.shared_experts is {moe.shared_experts} (Mixtral has no shared experts)")
    if moe.num_experts_per_layer is not None:
        why.append(f"moe.num_experts_per_layer is {moe.num_experts_per_layer} (Mixtral: one number of experts)")
    if moe.residual:
        why.append("moe.residual is true (Mixtral has no dense branch beside the experts)")
    if moe.null_experts:
        why.append(f"moe.null_experts is {moe.null_experts} (Mixtral has no null experts)")
    r = moe.router
    if not isinstance(r, TopKRouterConfig):
        why.append(f"moe.router.kind is {r.kind} (Mixtral routes by top-k of a softmax over x W^T)")
    else:
        if r.score_func != "softmax":
            why.append(f"moe.router.score_func is {r.score_func} (Mixtral: softmax)")
        if not r.renormalize:
            why.append("moe.router.renormalize is false (Mixtral renormalises the top-k weights to sum to 1)")
        if r.bias_update_rate > 0:
            why.append(
                f"moe.router.bias_update_rate is {r.bias_update_rate} (a selection bias; Mixtral chooses by the scores)"
            )
        if r.correction_bias:
            why.append("moe.router.correction_bias is true (a selection bias; Mixtral chooses by the scores)")
        if r.num_groups > 1:
            why.append(f"moe.router.num_groups is {r.num_groups} (Mixtral's top-k is not group-limited)")
        if r.gate_scale != 1.0:
            why.append(f"moe.router.gate_scale is {r.gate_scale} (Mixtral does not scale its gates)")
    return why
