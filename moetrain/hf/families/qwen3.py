"""Qwen3 (``Qwen3ForCausalLM``, model_type ``qwen3``) -> moetrain's dense model, exactly.

The shared dense decoder (:mod:`.dense`) with a head dim of its own (``head_dim``, default 128); an
RMSNorm over each head's dims on queries and keys before rotary positions (``model.qk_norm: head``);
biases on q, k, v and o when ``attention_bias``; sliding windows refused where they hide a key
(:func:`.dense.check_qwen_windows`).
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import decoder, dense
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields

MODEL_TYPES = ("qwen3",)
ARCHITECTURE = "Qwen3ForCausalLM"
DEFAULT_THETA = 10000.0
# Qwen3Config's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
    "attention_dropout": 0.0,
}


def _fields(hf_config: dict) -> Fields:
    return Fields(hf_config, DEFAULTS)


def check(hf_config: dict) -> None:
    f = _fields(hf_config)
    dense.check(f, MODEL_TYPES, DEFAULT_THETA)
    decoder.check_head_dim_not_null(f, "Qwen3Attention")
    dense.check_qwen_windows(f)


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = _fields(hf_config)
    bias = bool(f["attention_bias"])
    # Qwen3Attention reads config.head_dim: the class default (128) where the file leaves it out
    return dense.sections(
        f, DEFAULT_THETA, qkv_bias=bias, attn_out_bias=bias, qk_norm="head", clip_qkv=None, head_dim=f["head_dim"]
    )


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    return dense.rules(to_moetrain(hf_config))
