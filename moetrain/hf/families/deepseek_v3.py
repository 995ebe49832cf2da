"""DeepSeek-V3 (``model_type: deepseek_v3``, ``DeepseekV3ForCausalLM``) <-> moetrain, exact.

What maps to what, and what is refused: docs/import.md, "DeepSeek-V3". In short: multi-head latent
attention (``model.attention: mla``), rotary scaling (:mod:`.rope`), dense first blocks (``moe.layers``),
swiglu routed experts and shared experts, and the top-k router with sigmoid scores, the
``e_score_correction_bias`` (``correction_bias``), group-limited selection, renormalised gates and the
routed scaling factor.

Tensors. The Hub's checkpoints, and what ``save_pretrained`` of transformers 5.24 writes, hold one tensor
per expert (``mlp.experts.{e}.gate_proj.weight`` ...); transformers 5.24 holds them in memory fused
(``mlp.experts.gate_up_proj`` [E, 2F, D] with gate rows first, ``mlp.experts.down_proj`` [E, D, F]), which
a checkpoint saved from ``state_dict()`` has. :func:`rules` reads either, chosen by the tensor names;
export writes the per-expert layout. A fused ``gate_up_proj`` slice feeds two rules (gate rows: w1, up
rows: w3), so each of those two rules' ``to_hf`` returns the rows it read, and the two together give
back the slice bit for bit.

Multi-token-prediction layers (``num_nextn_predict_layers``, ``num_mtp_layers`` in transformers 5.24; the
Hub's ``model.layers.61.*``) are not part of ``DeepseekV3ForCausalLM``'s forward (transformers loads them
only for speculative decoding): :func:`skipped_tensors` names them. moetrain's model leaves them out; the
import keeps them beside its step-0 checkpoint, so that checkpoint exports them back, and
:func:`without_skipped` is the config of an export without them (a trained model's: they were not
trained with it).
"""

from __future__ import annotations

from typing import Any

import torch

from moetrain.hf.families.base import (
    Fields,
    TensorRule,
    UnsupportedConfigError,
    concat_rule,
    copy_rule,
    expert_rule,
    linear_rule,
)
from moetrain.hf.families.rope import hf_rope_parameters, reads_as, rope_fields

MODEL_TYPES = ("deepseek_v3",)
ARCHITECTURE = "DeepseekV3ForCausalLM"
LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm: DeepseekV3RMSNorm's default eps
# DeepseekV3Config's defaults (transformers 5.24) for every field read here: a field the file leaves out
# reads as the class fills it (tests/test_hf_family_configs.py checks them against the class).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "attention_bias": False,
    "num_mtp_layers": 1,
}
DEFAULT_THETA = 10000.0  # DeepseekV3Config.default_theta
# DeepseekV3Config.attribute_map: the Hub's files say num_nextn_predict_layers, transformers 5.24 num_mtp_layers
ALIASES = {"num_local_experts": "n_routed_experts", "num_nextn_predict_layers": "num_mtp_layers"}
# Fields that transformers 5.24 has no attribute for, but the Hub's files carry: accepted with these values only.
FIXED_EXTRA = {
    "topk_method": ("noaux_tc", "moetrain routes as noaux_tc (sigmoid scores, correction bias, group limit)"),
    "scoring_func": ("sigmoid", "DeepSeek-V3's router scores are sigmoids"),
    "moe_layer_freq": (1, "transformers 5.24 puts an MoE layer in every block from first_k_dense_replace on"),
}
# Fields that must not be null: transformers cannot build the model with them null.
NOT_NULL = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
    "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok",
    "first_k_dense_replace", "max_position_embeddings", "rms_norm_eps",
)  # fmt: skip


def fields(hf_config: dict) -> Fields:
    """``hf_config`` read as ``DeepseekV3Config`` reads it (class defaults for what it leaves out)."""
    return Fields(hf_config, DEFAULTS, ALIASES)


def check(hf_config: dict) -> None:
    """Refuse every field value that moetrain does not compute exactly as ``DeepseekV3ForCausalLM``."""
    c = hf_config
    f = fields(c)
    if c.get("model_type") not in MODEL_TYPES:
        raise UnsupportedConfigError("model_type", c.get("model_type"), f"this family maps {MODEL_TYPES[0]}")
    if c.get("quantization_config") is not None:
        quant = c["quantization_config"]
        raise UnsupportedConfigError(
            "quantization_config",
            quant.get("quant_method", "?") if isinstance(quant, dict) else quant,
            "quantized weights (the Hub's fp8 blocks) are not imported; dequantize the checkpoint to bf16 or fp32 first",
        )
    for name in NOT_NULL:
        if f[name] is None:
            raise UnsupportedConfigError(name, None, "must be set (transformers cannot build the model without it)")
    fixed = {
        "hidden_act": ("silu", "the experts and dense FFNs are SwiGLU (silu)"),
        "attention_bias": (False, "multi-head latent attention has no biases in moetrain"),
        "pretraining_tp": (1, "tensor-parallel slicing of the pretraining is not reproduced"),
    }
    for name, (want, why) in fixed.items():
        if f[name] is not None and f[name] != want:
            raise UnsupportedConfigError(name, f[name], f"only {want!r}: {why}")
    for name, (want, why) in FIXED_EXTRA.items():
        if c.get(name) is not None and c[name] != want:
            raise UnsupportedConfigError(name, c[name], f"only {want!r}: {why}")
    heads = f["num_attention_heads"]
    if kv_heads(f) != heads:
        raise UnsupportedConfigError(
            "num_key_value_heads",
            kv_heads(f),
            f"must equal num_attention_heads ({heads}): latent attention gives every head its own keys and values",
        )
    if f["n_shared_experts"] < 1:
        raise UnsupportedConfigError("n_shared_experts", f["n_shared_experts"], "at least 1 shared expert")
    experts, groups = f["n_routed_experts"], f["n_group"]
    if experts % groups or experts // groups < 2:
        raise UnsupportedConfigError(
            "n_group", groups, f"must split n_routed_experts ({experts}) into groups of at least 2 experts"
        )
    if not 1 <= f["topk_group"] <= groups:
        raise UnsupportedConfigError("topk_group", f["topk_group"], f"must be between 1 and n_group ({groups})")
    if f["num_experts_per_tok"] > f["topk_group"] * (experts // groups):
        raise UnsupportedConfigError(
            "num_experts_per_tok", f["num_experts_per_tok"], "more than the experts of topk_group groups"
        )
    if f["routed_scaling_factor"] <= 0:
        raise UnsupportedConfigError("routed_scaling_factor", f["routed_scaling_factor"], "must be positive")
    _rope(f)  # refuses what rotary scaling cannot compute


def kv_heads(f: Fields) -> int:
    """``num_key_value_heads``; null means one per query head (``DeepseekV3Config.__post_init__``)."""
    kv = f["num_key_value_heads"]
    return f["num_attention_heads"] if kv is None else kv


def _rope(f: Fields) -> dict[str, Any]:
    return rope_fields({"max_position_embeddings": f["max_position_embeddings"], **f.raw}, DEFAULT_THETA)


def moe_blocks(hf_config: dict) -> list[int]:
    """Blocks whose FFN is routed: every block from ``first_k_dense_replace`` on (transformers 5.24)."""
    f = fields(hf_config)
    return list(range(f["first_k_dense_replace"], f["num_hidden_layers"]))


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = fields(hf_config)
    model = {
        "arch": "llama",
        "vocab_size": f["vocab_size"],
        "d_model": f["hidden_size"],
        "n_layers": f["num_hidden_layers"],
        "n_heads": f["num_attention_heads"],
        "norm_eps": float(f["rms_norm_eps"]),
        "d_ff": f["intermediate_size"],
        "ffn_type": "swiglu",
        "norm": "rmsnorm",
        "bias": False,
        "max_seq_len": f["max_position_embeddings"],
        "tie_embeddings": bool(f["tie_word_embeddings"]),
        "init_std": f["initializer_range"],
        "attention": "mla",
        "mla": {
            "q_lora_rank": f["q_lora_rank"],
            "kv_lora_rank": f["kv_lora_rank"],
            "qk_nope_head_dim": f["qk_nope_head_dim"],
            "qk_rope_head_dim": f["qk_rope_head_dim"],
            "v_head_dim": f["v_head_dim"],
            "latent_norm_eps": LATENT_NORM_EPS,
        },
        **_rope(f),
    }
    blocks = moe_blocks(hf_config)
    if not blocks:
        return {"model": model, "moe": None}
    moe = {
        "placement": "replace_ffn",
        "layers": blocks,
        "num_experts": f["n_routed_experts"],
        "expert_type": "swiglu",
        "expert_hidden": f["moe_intermediate_size"],
        "shared_experts": f["n_shared_experts"],
        "shared_expert_hidden": f["moe_intermediate_size"],
        "router": {
            "kind": "topk",
            "top_k": f["num_experts_per_tok"],
            "score_func": "sigmoid",
            "renormalize": bool(f["norm_topk_prob"]),
            "gate_scale": float(f["routed_scaling_factor"]),
            "num_groups": f["n_group"],
            "topk_groups": f["topk_group"],
            "correction_bias": True,
            "load_balance_coeff": 0.0,
        },
    }
    return {"model": model, "moe": moe}


# ---------------------------------------------------------------------------------------------------
# Tensors


def _rotary_order(hf_config: dict) -> torch.Tensor | None:
    """moetrain's rotary dims as indices into DeepSeek's (``rope_interleave``: pairs (2i, 2i+1) become
    (i, i + P2/2)); None when the checkpoint already pairs dim i with i + P2/2."""
    f = fields(hf_config)
    if not f["rope_interleave"]:
        return None
    p2 = f["qk_rope_head_dim"]
    return torch.cat([torch.arange(0, p2, 2), torch.arange(1, p2, 2)])


def _rotary_rows_rule(target: str, source: str, heads: int, nope: int, order: torch.Tensor | None) -> TensorRule:
    """A weight whose rows are ``heads`` blocks of ``nope`` plain then P2 rotary rows (``heads`` 1 with
    nope = R: ``kv_a_proj_with_mqa``); the rotary rows reordered into moetrain's layout."""
    if order is None:
        return linear_rule(target, source)
    back = torch.argsort(order)

    def reorder(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w_h = w.reshape(heads, -1, w.shape[-1])
        return torch.cat([w_h[:, :nope], w_h[:, nope:][:, idx]], dim=1).reshape(w.shape).contiguous()

    return TensorRule(target, (source,), lambda w: reorder(w, order), lambda t: (reorder(t, back),))


def _bias_rule(target: str, source: str) -> TensorRule:
    """``e_score_correction_bias`` (fp32) <-> the router's ``bias_base_E``: its fp32 bits held as int32."""
    return TensorRule(
        target,
        (source,),
        lambda b: b.to(torch.float32).view(torch.int32).clone(),
        lambda t: (t.view(torch.float32).clone(),),
    )


def _shared_rules(ours: str, theirs: str, width: int) -> list[TensorRule]:
    """The shared experts' MLP: moetrain's ``w_in_DF`` = [gate; up]^T, ``w_out_FD`` = down^T."""
    w_in = TensorRule(
        f"{ours}.shared.w_in_DF",
        (f"{theirs}.shared_experts.gate_proj.weight", f"{theirs}.shared_experts.up_proj.weight"),
        lambda g, u: torch.cat([g, u], dim=0).t().contiguous(),
        lambda t: tuple(p.t().contiguous() for p in t.split(width, dim=1)),
    )
    w_out = TensorRule(
        f"{ours}.shared.w_out_FD",
        (f"{theirs}.shared_experts.down_proj.weight",),
        lambda w: w.t().contiguous(),
        lambda t: (t.t().contiguous(),),
    )
    return [w_in, w_out]


def _fused_expert_rules(ours: str, theirs: str, e: int, width: int) -> list[TensorRule]:
    """Expert e from transformers' in-memory layout: ``gate_up_proj[e]`` [2F, D] (gate rows, then up rows)
    and ``down_proj[e]`` [D, F]."""

    def half(part: int) -> TensorRule:
        target = f"{ours}.experts.{'w1' if part == 0 else 'w3'}_SLDF"
        rows = slice(part * width, (part + 1) * width)
        return TensorRule(
            target,
            (f"{theirs}.experts.gate_up_proj",),
            lambda gu: gu[rows].t().unsqueeze(0).contiguous(),
            lambda t: (t[0].t().contiguous(),),  # the rows it read (see the module docstring)
            expert=e,
            index=e,
        )

    down = TensorRule(
        f"{ours}.experts.w2_SLFD",
        (f"{theirs}.experts.down_proj",),
        lambda w: w.t().unsqueeze(0).contiguous(),
        lambda t: (t[0].t().contiguous(),),
        expert=e,
        index=e,
    )
    return [half(0), half(1), down]


def _attention_rules(hf_config: dict, ours: str, theirs: str) -> list[TensorRule]:
    c, order = fields(hf_config), _rotary_order(hf_config)
    heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    rules = [
        _rotary_rows_rule(
            f"{ours}.kv_a_proj.weight", f"{theirs}.kv_a_proj_with_mqa.weight", 1, c["kv_lora_rank"], order
        ),
        copy_rule(f"{ours}.kv_a_norm.weight", f"{theirs}.kv_a_layernorm.weight"),
        linear_rule(f"{ours}.kv_b_proj.weight", f"{theirs}.kv_b_proj.weight"),
        linear_rule(f"{ours}.proj.weight", f"{theirs}.o_proj.weight"),
    ]
    if c["q_lora_rank"] is None:
        return [_rotary_rows_rule(f"{ours}.q_proj.weight", f"{theirs}.q_proj.weight", heads, nope, order), *rules]
    return [
        linear_rule(f"{ours}.q_a_proj.weight", f"{theirs}.q_a_proj.weight"),
        copy_rule(f"{ours}.q_a_norm.weight", f"{theirs}.q_a_layernorm.weight"),
        _rotary_rows_rule(f"{ours}.q_b_proj.weight", f"{theirs}.q_b_proj.weight", heads, nope, order),
        *rules,
    ]


def _ffn_rules(hf_config: dict, i: int, fused: bool) -> list[TensorRule]:
    c = fields(hf_config)
    ours, theirs = f"layers.{i}.ffn", f"model.layers.{i}.mlp"
    if i not in moe_blocks(hf_config):
        return [
            concat_rule(
                f"{ours}.up.weight",
                (f"{theirs}.gate_proj.weight", f"{theirs}.up_proj.weight"),
                [c["intermediate_size"]] * 2,
            ),
            linear_rule(f"{ours}.down.weight", f"{theirs}.down_proj.weight"),
        ]
    width = c["moe_intermediate_size"]
    rules = [
        copy_rule(f"{ours}.router.weight_ED", f"{theirs}.gate.weight"),
        _bias_rule(f"{ours}.router.bias_base_E", f"{theirs}.gate.e_score_correction_bias"),
        *_shared_rules(ours, theirs, width * c["n_shared_experts"]),
    ]
    for e in range(c["n_routed_experts"]):
        if fused:
            rules += _fused_expert_rules(ours, theirs, e, width)
        else:
            per = f"{theirs}.experts.{e}"
            rules += [
                expert_rule(f"{ours}.experts.w1_SLDF", f"{per}.gate_proj.weight", e),
                expert_rule(f"{ours}.experts.w3_SLDF", f"{per}.up_proj.weight", e),
                expert_rule(f"{ours}.experts.w2_SLFD", f"{per}.down_proj.weight", e),
            ]
    return rules


def is_fused(hf_config: dict, tensor_names: set[str] | None) -> bool:
    """Whether the checkpoint holds transformers' fused ``[E, ...]`` expert tensors (else one per expert)."""
    blocks = moe_blocks(hf_config)
    return bool(tensor_names and blocks) and f"model.layers.{blocks[0]}.mlp.experts.down_proj" in tensor_names


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    check(hf_config)
    c = hf_config
    fused = is_fused(c, tensor_names)
    out = [copy_rule("embed.weight", "model.embed_tokens.weight"), copy_rule("ln_f.weight", "model.norm.weight")]
    if not fields(c)["tie_word_embeddings"]:
        out.append(linear_rule("lm_head.weight", "lm_head.weight"))
    for i in range(fields(c)["num_hidden_layers"]):
        theirs = f"model.layers.{i}"
        out += [
            copy_rule(f"layers.{i}.ln1.weight", f"{theirs}.input_layernorm.weight"),
            copy_rule(f"layers.{i}.ln2.weight", f"{theirs}.post_attention_layernorm.weight"),
            *_attention_rules(c, f"layers.{i}.attn", f"{theirs}.self_attn"),
            *_ffn_rules(c, i, fused),
        ]
    return out


def skipped_tensors(hf_config: dict, tensor_names: set[str]) -> list[str]:
    """The checkpoint's tensors that no rule reads, on purpose: the multi-token-prediction layers
    ``model.layers.{n}.*`` for n >= num_hidden_layers, which ``DeepseekV3ForCausalLM`` never runs."""
    first_mtp = fields(hf_config)["num_hidden_layers"]
    out = []
    for name in sorted(tensor_names):
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= first_mtp:
            out.append(name)
    return out


def without_skipped(hf_config: dict) -> dict:
    """The config fields that say an exported folder holds no multi-token-prediction layers (0 under both
    names where the file uses both: transformers 4's and 5.24's)."""
    out = {"num_mtp_layers": 0}
    if "num_nextn_predict_layers" in hf_config:
        out["num_nextn_predict_layers"] = 0
    return out


def to_hf_config(hf_config: dict, model: dict, moe: dict | None) -> dict:
    """``config.json`` for export: the imported one with moetrain's fields written back."""
    _check_still_deepseek(model, moe)
    mla = model["mla"]
    keep_rope = reads_as(hf_config, model, DEFAULT_THETA)  # the imported file's rope fields, as they were
    out = {k: v for k, v in hf_config.items() if keep_rope or k not in ("rope_scaling", "rope_theta")}
    out.update(
        model_type=MODEL_TYPES[0],
        architectures=[ARCHITECTURE],
        vocab_size=model["vocab_size"],
        hidden_size=model["d_model"],
        num_hidden_layers=model["n_layers"],
        num_attention_heads=model["n_heads"],
        num_key_value_heads=model["n_heads"],
        rms_norm_eps=model["norm_eps"],
        intermediate_size=model["d_ff"],
        max_position_embeddings=model["max_seq_len"],
        tie_word_embeddings=model["tie_embeddings"],
        initializer_range=model["init_std"],
        q_lora_rank=mla["q_lora_rank"],
        kv_lora_rank=mla["kv_lora_rank"],
        qk_nope_head_dim=mla["qk_nope_head_dim"],
        qk_rope_head_dim=mla["qk_rope_head_dim"],
        v_head_dim=mla["v_head_dim"],
        hidden_act="silu",
        attention_bias=False,
    )
    if not keep_rope:
        out["rope_parameters"] = hf_rope_parameters(model)
    if not any(name in hf_config for name in ("num_mtp_layers", "num_nextn_predict_layers")):
        out.update(without_skipped(out))  # a model trained in moetrain has no multi-token-prediction layers
    n = model["n_layers"]
    if moe is None:
        out.update(first_k_dense_replace=n)
        return out
    r = moe["router"]
    out.update(
        first_k_dense_replace=_moe_blocks_of(moe, n)[0],
        n_routed_experts=moe["num_experts"],
        moe_intermediate_size=moe.get("expert_hidden") or model["d_ff"],
        n_shared_experts=moe["shared_experts"],
        num_experts_per_tok=r["top_k"],
        norm_topk_prob=r["renormalize"],
        routed_scaling_factor=r["gate_scale"],
        n_group=r["num_groups"],
        topk_group=r["topk_groups"] or r["num_groups"],
    )
    return out


def _moe_blocks_of(moe: dict, n_layers: int) -> list[int]:
    """moetrain's MoE blocks (``MoEConfig.moe_blocks``) from the plain dict."""
    if moe.get("layers") is not None:
        return sorted(moe["layers"])
    return [i for i in range(n_layers) if (i + 1) % moe.get("every", 1) == 0]


def _check_still_deepseek(model: dict, moe: dict | None) -> None:
    """Refuse a moetrain model that ``DeepseekV3ForCausalLM`` no longer computes."""
    want = {
        "model.arch": (model.get("arch"), "llama"),
        "model.attention": (model.get("attention"), "mla"),
        "model.ffn_type": (model.get("ffn_type"), "swiglu"),
        "model.norm": (model.get("norm"), "rmsnorm"),
        "model.bias": (model.get("bias"), False),
        "model.embed_scale": (model.get("embed_scale", "none"), "none"),
        "model.mla.latent_norm_eps": ((model.get("mla") or {}).get("latent_norm_eps"), LATENT_NORM_EPS),
    }
    if moe is not None:
        r, n = moe["router"], model["n_layers"]
        blocks = _moe_blocks_of(moe, n)
        width = moe.get("expert_hidden") or model["d_ff"]
        want.update(
            {
                "moe.placement": (moe["placement"], "replace_ffn"),
                "the MoE blocks": (blocks, list(range(blocks[0] if blocks else n, n))),
                "moe.expert_type": (moe["expert_type"], "swiglu"),
                "moe.shared_expert_hidden": (moe.get("shared_expert_hidden") or width, width),
                "moe.shared_experts >= 1": (moe.get("shared_experts", 0) >= 1, True),
                "moe.null_experts": (moe.get("null_experts", 0), 0),
                "moe.residual": (moe.get("residual", False), False),
                "moe.capacity_factor": (moe.get("capacity_factor"), None),
                "moe.num_experts_per_layer": (moe.get("num_experts_per_layer"), None),
                "moe.router.kind": (r["kind"], "topk"),
                "moe.router.score_func": (r.get("score_func"), "sigmoid"),
                "moe.router.correction_bias": (r.get("correction_bias"), True),
            }
        )
    for field, (got, expected) in want.items():
        if got != expected:
            raise UnsupportedConfigError(
                "architectures", ARCHITECTURE, f"moetrain's {field} is {got!r}; {ARCHITECTURE} needs {expected!r}"
            )
