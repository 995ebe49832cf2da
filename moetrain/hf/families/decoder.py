"""What the four Llama-style MoE decoders share: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Each is, per block, ``h += o_proj(attn(RMSNorm(h)))`` with rotary positions (``rotate_half``) and
grouped-query attention, then ``h += FFN(RMSNorm(h))`` where the FFN is a top-k softmax MoE of SwiGLU
experts (or, in Qwen's dense blocks, one SwiGLU MLP); no biases besides the attention's; untied or
tied output head. The families differ in attention biases, query/key norms, dense blocks, the shared
expert and whether the top-k weights are renormalised: each family module says which.

Reading a ``config.json``: a field the file omits takes the default of the family's ``transformers``
5.24 config class (:class:`~moetrain.hf.families.base.Fields`), as ``XxxConfig.from_dict`` does; ``tests/test_hf_family_configs.py``
checks the defaults against those classes.

Shape letters (tensor rules): the legend in ``moetrain/moe/__init__.py`` and ``moetrain/backbone/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.config.routers import TopKRouterConfig
from moetrain.hf.families.base import (  # noqa: F401 - Fields: the families read their configs through it
    Fields,
    TensorRule,
    UnsupportedConfigError,
    concat_rule,
    copy_rule,
    expert_rule,
    fused_expert_rule,
    linear_rule,
)
from moetrain.hf.families.rope import hf_rope_parameters, reads_as, rope_fields


def refuse(field: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(field, value, why)


def check_common(f: Fields, model_types: tuple[str, ...], default_theta: float) -> None:
    """The checks every family makes: :func:`check_backbone`, and the experts and top-k."""
    check_backbone(f, model_types, default_theta)
    experts, top_k = f["num_experts"], f["num_experts_per_tok"]
    if experts < 1:
        raise refuse("num_experts", experts, "a model without experts is not supported; supported: 1 or more")
    if not 1 <= top_k <= experts:
        raise refuse("num_experts_per_tok", top_k, f"must be between 1 and the number of experts ({experts})")


def check_backbone(f: Fields, model_types: tuple[str, ...], default_theta: float) -> None:
    """What the MoE families and the dense ones (:mod:`.dense`) check alike: model type, plain weights,
    SiLU, no attention dropout, rotary positions moetrain computes, head counts."""
    if f.raw.get("model_type") not in model_types:
        raise refuse("model_type", f.raw.get("model_type"), f"this mapping reads {' or '.join(model_types)}")
    if f.raw.get("quantization_config") is not None:
        raise refuse(
            "quantization_config",
            f.raw["quantization_config"],
            "quantized weights are not supported; import the unquantized checkpoint",
        )
    if f["hidden_act"] not in ("silu", "swish"):
        raise refuse("hidden_act", f["hidden_act"], "moetrain's SwiGLU uses silu (supported: silu, swish)")
    if f["attention_dropout"]:
        raise refuse(
            "attention_dropout",
            f["attention_dropout"],
            "moetrain has no dropout on attention weights alone; supported: 0.0",
        )
    rope(f, default_theta)
    heads, kv_heads = f["num_attention_heads"], kv_head_count(f)
    if heads % kv_heads:
        raise refuse("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
    if head_dim_of(f) % 2:
        raise refuse("head_dim", head_dim_of(f), "rotary positions need an even head dim")


def rope(f: Fields, default_theta: float) -> dict[str, Any]:
    """``model.rope_theta`` and ``model.rope_scaling``, read as every family reads them
    (:func:`moetrain.hf.families.rope.rope_fields`); ``max_position_embeddings`` at the class default
    where the file leaves it out (yarn and llama3 fall back to it)."""
    return rope_fields({"max_position_embeddings": f["max_position_embeddings"], **f.raw}, default_theta)


def kv_head_count(f: Fields) -> int:
    """``num_key_value_heads``; null means one per query head (the classes' ``__post_init__``)."""
    kv = f["num_key_value_heads"]
    return f["num_attention_heads"] if kv is None else kv


def head_dim_of(f: Fields) -> int:
    """``head_dim`` where the file gives one, else ``hidden_size // num_attention_heads`` (floored, as
    the classes compute it)."""
    given = f.raw.get("head_dim")
    return given if given is not None else f["hidden_size"] // f["num_attention_heads"]


def check_head_dim_not_null(f: Fields, attention_class: str) -> None:
    """Qwen2-MoE, Qwen3-MoE and OLMoE read ``getattr(config, "head_dim", ...)``: a null value is
    taken as is and the attention cannot be built."""
    if "head_dim" in f.raw and f.raw["head_dim"] is None:
        raise refuse("head_dim", None, f"{attention_class} cannot be built with it; give a number or leave it out")


def check_window(field: str, window: Any, f: Fields) -> None:
    """Sliding-window attention in use is refused; a window of at least ``max_position_embeddings``
    never hides a key within the positions the model is used for (moetrain never goes past
    ``model.max_seq_len``, which import sets to ``max_position_embeddings``)."""
    longest = f["max_position_embeddings"]
    if window is None or window < longest:
        raise refuse(
            field,
            window,
            f"sliding-window attention is not supported; supported: a window of at least "
            f"max_position_embeddings ({longest}) or none",
        )


def model_section(f: Fields, default_theta: float, **attention: Any) -> dict[str, Any]:
    """moetrain's ``model`` section for the shared backbone; ``attention``: ``qkv_bias``,
    ``attn_out_bias``, ``qk_norm``, ``clip_qkv`` and ``d_ff`` (the dense blocks' width) of the family."""
    return {
        "arch": "llama",
        "vocab_size": f["vocab_size"],
        "d_model": f["hidden_size"],
        "n_layers": f["num_hidden_layers"],
        "n_heads": f["num_attention_heads"],
        "n_kv_heads": kv_head_count(f),
        "head_dim": head_dim_of(f),
        **rope(f, default_theta),
        "norm_eps": float(f["rms_norm_eps"]),
        "ffn_type": "swiglu",
        "norm": "rmsnorm",
        "bias": False,
        "max_seq_len": f["max_position_embeddings"],
        "dropout": 0.0,
        "tie_embeddings": bool(f["tie_word_embeddings"]),
        "init_std": f["initializer_range"],
        "embed_scale": "none",
        **attention,
    }


def moe_section(f: Fields, moe_blocks: list[int], expert_hidden: int, renormalize: bool, **extra: Any) -> dict:
    """moetrain's ``moe`` section: top-k of a softmax over all experts (fp32), dropless, SwiGLU experts.

    The load-balance loss is on where transformers adds one in training (``output_router_logits``),
    with its coefficient. NOTE: transformers averages the counts and probabilities over all layers
    before multiplying; moetrain adds one Switch loss per layer, so fine-tuning losses differ there
    (the forward pass does not)."""
    balance = f["router_aux_loss_coef"] if f["output_router_logits"] else 0.0
    return {
        "placement": "replace_ffn",
        "layers": moe_blocks,
        "num_experts": f["num_experts"],
        "expert_type": "swiglu",
        "expert_hidden": expert_hidden,
        "capacity_factor": None,
        "router": {
            "kind": "topk",
            "top_k": f["num_experts_per_tok"],
            "score_func": "softmax",
            "renormalize": renormalize,
            "load_balance_coeff": balance,
            "z_loss_coeff": 0.0,
            "init_std": f["initializer_range"],
        },
        **extra,
    }


# --- tensors -------------------------------------------------------------------------------------


def backbone_rules(n_layers: int, tied: bool) -> list[TensorRule]:
    """Embedding, final norm, output head (untied only) and each block's two norms."""
    rules = [copy_rule("embed.weight", "model.embed_tokens.weight"), copy_rule("ln_f.weight", "model.norm.weight")]
    if not tied:  # a tied checkpoint's lm_head.weight, if written, is a copy of the embedding: no rule
        rules.append(linear_rule("lm_head.weight", "lm_head.weight"))
    for i in range(n_layers):
        rules.append(copy_rule(f"layers.{i}.ln1.weight", f"model.layers.{i}.input_layernorm.weight"))
        rules.append(copy_rule(f"layers.{i}.ln2.weight", f"model.layers.{i}.post_attention_layernorm.weight"))
    return rules


def attention_rules(i: int, model: ModelConfig) -> list[TensorRule]:
    """q, k, v -> moetrain's fused qkv (query rows, key rows, value rows); o; the q/k norms."""
    H, G, A = model.n_heads, model.kv_heads, model.resolved_head_dim
    src, dst = f"model.layers.{i}.self_attn.", f"layers.{i}.attn."
    sizes = [H * A, G * A, G * A]
    rules = [concat_rule(dst + "qkv.weight", tuple(src + f"{p}_proj.weight" for p in "qkv"), sizes)]
    if model.qkv_bias:
        rules.append(concat_rule(dst + "qkv.bias", tuple(src + f"{p}_proj.bias" for p in "qkv"), sizes))
    rules.append(linear_rule(dst + "proj.weight", src + "o_proj.weight"))
    if model.attn_out_bias:
        rules.append(copy_rule(dst + "proj.bias", src + "o_proj.bias"))
    if model.qk_norm != "none":
        rules += [
            copy_rule(dst + "q_norm.weight", src + "q_norm.weight"),
            copy_rule(dst + "k_norm.weight", src + "k_norm.weight"),
        ]
    return rules


def expert_rules(
    i: int, src: str, names: tuple[str, str, str], num_experts: int, width: int, fused: bool
) -> list[TensorRule]:
    """Router and experts of the MoE block ``src`` (e.g. ``model.layers.0.mlp.``).

    ``names``: the per-expert layout's (gate, up, down) projections, ``experts.N.<name>.weight``;
    ``fused``: the layout transformers 5 holds in memory (and writes with ``save_original_format=False``),
    ``experts.gate_up_proj`` [E, 2F, D] (gate rows, then up rows) and ``experts.down_proj`` [E, D, F].
    Either way moetrain's w1 is the gate, w3 the up and w2 the down projection, one global expert each.
    """
    dst = f"layers.{i}.ffn."
    rules = [linear_rule(dst + "router.weight_ED", src + "gate.weight")]
    for e in range(num_experts):
        if fused:
            rules += [
                fused_expert_rule(dst + "experts.w1_SLDF", src + "experts.gate_up_proj", e, (0, width)),
                fused_expert_rule(dst + "experts.w3_SLDF", src + "experts.gate_up_proj", e, (width, 2 * width)),
                fused_expert_rule(dst + "experts.w2_SLFD", src + "experts.down_proj", e),
            ]
        else:
            gate, up, down = (src + f"experts.{e}.{name}.weight" for name in names)
            rules += [
                expert_rule(dst + "experts.w1_SLDF", gate, e),
                expert_rule(dst + "experts.w3_SLDF", up, e),
                expert_rule(dst + "experts.w2_SLFD", down, e),
            ]
    return rules


def dense_mlp_rules(i: int, width: int) -> list[TensorRule]:
    """A dense block's SwiGLU MLP -> moetrain's ``DenseFFN`` (``up`` holds gate rows, then up rows)."""
    src, dst = f"model.layers.{i}.mlp.", f"layers.{i}.ffn."
    gate_up = (src + "gate_proj.weight", src + "up_proj.weight")
    return [
        concat_rule(dst + "up.weight", gate_up, [width, width]),
        linear_rule(dst + "down.weight", src + "down_proj.weight"),
    ]


def qwen_moe_blocks(f: Fields) -> list[int]:
    """Qwen2-MoE's and Qwen3-MoE's MoE blocks: not in ``mlp_only_layers`` and ``(i + 1) %
    decoder_sparse_step == 0``; the others are dense MLPs of width ``intermediate_size``."""
    step, dense = f["decoder_sparse_step"], f["mlp_only_layers"] or []
    if not isinstance(step, int) or step < 1:
        raise refuse("decoder_sparse_step", step, "must be a positive integer")
    blocks = [i for i in range(f["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
    if not blocks:
        raise refuse(
            "mlp_only_layers",
            dense,
            f"with decoder_sparse_step {step} no block has experts; a dense model is not supported",
        )
    return blocks


def qwen_block_fields(f: Fields, model: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    """The MoE blocks written back as Qwen's fields: the imported file's ``decoder_sparse_step`` and
    ``mlp_only_layers`` where they give moetrain's blocks, else ``decoder_sparse_step`` 1 and the dense
    blocks listed in ``mlp_only_layers``; the dense MLPs' width ``intermediate_size``."""
    moe_at = moe.moe_blocks(model.n_layers)
    try:
        same = f["num_hidden_layers"] == model.n_layers and qwen_moe_blocks(f) == moe_at
    except UnsupportedConfigError:
        same = False
    if same:
        return {"intermediate_size": model.d_ff}
    dense = [i for i in range(model.n_layers) if i not in set(moe_at)]
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense, "intermediate_size": model.d_ff}


def uses_fused_experts(tensor_names: set[str] | None) -> bool:
    """Whether a checkpoint holds fused expert tensors (None: the per-expert layout export writes)."""
    return tensor_names is not None and any(n.endswith(".experts.gate_up_proj") for n in tensor_names)


# --- export: a moetrain model as the family -----------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """A moetrain field whose value the family cannot compute, and what the family has instead."""

    field: str
    value: Any
    why: str


def common_mismatches(model: ModelConfig, moe: MoEConfig | None, name: str) -> list[Mismatch]:
    """Where a moetrain model differs from the shared backbone and top-k softmax MoE of family ``name``."""
    why: list[Mismatch] = []
    expected = {"arch": "llama", "norm": "rmsnorm", "ffn_type": "swiglu", "bias": False, "embed_scale": "none"}
    for field, value in expected.items():
        if getattr(model, field) != value:
            why.append(Mismatch(f"model.{field}", getattr(model, field), f"{name} has {value}"))
    if moe is None:
        return [*why, Mismatch("moe", None, f"{name} has MoE blocks")]
    if moe.placement != "replace_ffn":
        why.append(Mismatch("moe.placement", moe.placement, f"{name}'s MoE layers replace a block's FFN"))
    plain = {"expert_type": "swiglu", "capacity_factor": None, "num_experts_per_layer": None, "residual": False}
    for field, value in {**plain, "null_experts": 0}.items():
        if getattr(moe, field) != value:
            why.append(Mismatch(f"moe.{field}", getattr(moe, field), f"{name} has {value} (dropless SwiGLU experts)"))
    r = moe.router
    if not isinstance(r, TopKRouterConfig):
        why.append(Mismatch("moe.router.kind", r.kind, f"{name} routes by the top k of a softmax"))
    elif r.score_func != "softmax" or r.bias_update_rate > 0:
        field, value = (
            ("score_func", r.score_func) if r.score_func != "softmax" else ("bias_update_rate", r.bias_update_rate)
        )
        why.append(Mismatch(f"moe.router.{field}", value, f"{name} chooses by the softmax scores alone"))
    return why


def expected_values(cfg: Any, section: str, expected: dict[str, Any], name: str) -> list[Mismatch]:
    """The fields of ``cfg`` (a moetrain section; dotted names reach into sub-sections) whose value is not
    the one family ``name`` computes. A field the section lacks (another router kind's) is skipped:
    :func:`common_mismatches` names the kind."""
    why = []
    for field, value in expected.items():
        have = cfg
        for part in field.split("."):
            have = getattr(have, part, _MISSING)
        if have is not _MISSING and have != value:
            why.append(Mismatch(f"{section}.{field}", have, f"{name} has {value!r}"))
    return why


_MISSING = object()


def every_block_mismatch(model: ModelConfig, moe: MoEConfig, name: str) -> list[Mismatch]:
    """Mixtral and OLMoE have an MoE layer in every block."""
    blocks = moe.moe_blocks(model.n_layers)
    if blocks == list(range(model.n_layers)):
        return []
    return [Mismatch("moe.layers", blocks, f"{name} has an MoE layer in every block")]


def raise_mismatches(why: list[Mismatch], architecture: str) -> None:
    """One error naming the first difference and listing the others."""
    if why:
        first = why[0]
        more = "".join(f"; also {m.field} = {m.value!r} ({m.why})" for m in why[1:])
        raise UnsupportedConfigError(
            first.field,
            first.value,
            f"{architecture} does not compute this: {first.why}{more}",
            where="moetrain config",
        )


def common_hf_fields(model: ModelConfig, moe: MoEConfig, hf_config: dict, default_theta: float) -> dict[str, Any]:
    """The config.json fields every family writes from the moetrain sections over ``hf_config`` (tied head;
    the rope: the imported file's own fields where they read as the model's rotary, else
    :func:`hf_rope_fields`)."""
    assert isinstance(moe.router, TopKRouterConfig)
    out = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        **({} if reads_as(hf_config, model.model_dump(mode="json"), default_theta) else hf_rope_fields(model)),
        "attention_dropout": 0.0,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "num_experts_per_tok": moe.router.top_k,
    }
    if moe.router.load_balance_coeff > 0:
        out.update(output_router_logits=True, router_aux_loss_coef=moe.router.load_balance_coeff)
    else:
        out["output_router_logits"] = False
    return out


def head_dim_field(hf_config: dict, model: ModelConfig) -> dict[str, Any]:
    """``head_dim`` for export: written where the imported file gave one or it is not ``hidden_size //
    num_attention_heads`` (what every class computes without it); else left as the file had it (absent,
    or Mixtral's null), so an import exports the config.json it came from."""
    A = model.resolved_head_dim
    if A == model.d_model // model.n_heads and hf_config.get("head_dim") is None:
        return {}
    return {"head_dim": A}


def keeps_window(hf_config: dict, model: ModelConfig, in_use: bool) -> bool:
    """Whether export writes the imported file's sliding-window fields back as they were: the window is not
    in use, or hides no key within ``model.max_seq_len`` (what import accepts). Otherwise the families write
    them as off, which computes the same over those positions."""
    window = hf_config.get("sliding_window")
    return not in_use or (isinstance(window, int) and window >= model.max_seq_len)


def hf_rope_fields(model: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` for transformers 5; ``rope_theta`` and (scaled) ``rope_scaling`` for 4, which
    5 reads as the same parameters (``rope_scaling`` wins there when set: the same dict)."""
    params = hf_rope_parameters(model.model_dump(mode="json"))
    legacy = {k: v for k, v in params.items() if k != "rope_theta"} if params["rope_type"] != "default" else None
    return {"rope_theta": model.rope_theta, "rope_parameters": params, "rope_scaling": legacy}


def sections(model: dict, moe: dict | None) -> tuple[ModelConfig, MoEConfig | None]:
    """The moetrain sections (plain dicts) validated, their defaults filled."""
    m = ModelConfig.model_validate(model)
    e = MoEConfig.model_validate(moe) if moe is not None else None
    if e is not None:
        e.check_against_model(m.n_layers)
    return m, e
