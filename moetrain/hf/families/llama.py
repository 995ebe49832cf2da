"""Llama (``LlamaForCausalLM``, model_type ``llama``) -> moetrain's dense model, exactly.

The shared dense decoder (:mod:`.dense`): biases on q, k, v and o when ``attention_bias``; no MLP biases
(``mlp_bias: true`` is refused); ``head_dim`` may differ from ``hidden_size / num_attention_heads``.
``pretraining_tp`` does not change what transformers 5 computes and is not read.
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import dense
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields, refuse

MODEL_TYPES = ("llama",)
ARCHITECTURE = "LlamaForCausalLM"
DEFAULT_THETA = 10000.0
# LlamaConfig's defaults (transformers 5.24) for every field read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
}


def _fields(hf_config: dict) -> Fields:
    return Fields(hf_config, DEFAULTS)


def check(hf_config: dict) -> None:
    f = _fields(hf_config)
    dense.check(f, MODEL_TYPES, DEFAULT_THETA)
    if f["mlp_bias"]:
        raise refuse("mlp_bias", f["mlp_bias"], "moetrain's SwiGLU MLP and experts have no biases; supported: false")


def to_moetrain(hf_config: dict) -> dict[str, Any]:
    check(hf_config)
    f = _fields(hf_config)
    bias = bool(f["attention_bias"])
    return dense.sections(f, DEFAULT_THETA, qkv_bias=bias, attn_out_bias=bias, qk_norm="none", clip_qkv=None)


def rules(hf_config: dict, tensor_names: set[str] | None = None) -> list[TensorRule]:
    return dense.rules(to_moetrain(hf_config))
