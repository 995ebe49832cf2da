"""Qwen2 (``Qwen2ForCausalLM``, model_type ``qwen2``) -> moetrain's dense model, exactly.

The shared dense decoder (:mod:`.dense`) with biases on the query, key and value projections (always,
as ``Qwen2Attention`` builds them) and none on the output projection; sliding windows refused where
they hide a key (:func:`.dense.check_qwen_windows`).
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import decoder, dense
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields

MODEL_TYPES = ("qwen2",)
ARCHITECTURE = "Qwen2ForCausalLM"
DEFAULT_THETA = 10000.0
# Qwen2Config's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
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
    decoder.check_head_dim_not_null(f, "Qwen2Attention")
    dense.check_qwen_windows(f)


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    return dense.sections(
        _fields(hf_config), DEFAULT_THETA, qkv_bias=True, attn_out_bias=False, qk_norm="none", clip_qkv=None
    )


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    return dense.rules(to_moetrain(hf_config))
