"""Tiny random dense Hugging Face models (Llama, Qwen2, Qwen3) built offline with transformers' own
classes, every weight redrawn as in tests/hf_tiny.py, and saved as ``moetrain upcycle`` reads them
(tests/test_upcycle*.py)."""

from __future__ import annotations

from pathlib import Path

import transformers
from hf_runs import VOCAB, bpe_tokenizer
from hf_tiny import COMMON, redrawn

# variant -> (config class, model class, config fields besides COMMON)
DENSE = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(intermediate_size=48, num_key_value_heads=2)),
    "llama-bias-tied-head_dim": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                                 dict(intermediate_size=48, attention_bias=True, tie_word_embeddings=True,
                                      head_dim=12)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(intermediate_size=48, num_key_value_heads=2)),
    "qwen2-window-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                          dict(intermediate_size=48, use_sliding_window=True, sliding_window=64, max_window_layers=1,
                               tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3-bias": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(intermediate_size=48, head_dim=12, attention_bias=True, num_key_value_heads=4)),
}  # fmt: skip


def dense_model(variant: str = "llama", seed: int = 0, **changes) -> transformers.PreTrainedModel:
    """The variant's tiny model, fp32, every weight redrawn (norms U(0.5, 1.5), biases N(0, 0.2),
    matrices N(0, 1/fan_in), embeddings N(0, 0.3^2)); ``changes``: config fields besides the variant's."""
    config_cls, model_cls, fields = DENSE[variant]
    ids = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = config_cls(**{**COMMON, **ids, **fields, **changes})
    return redrawn(model_cls, config, seed)


def dense_folder(folder: Path, variant: str = "llama", seed: int = 0, **changes) -> transformers.PreTrainedModel:
    """Save the variant (safetensors) and the BPE tokenizer of tests/hf_runs.py into ``folder``."""
    model = dense_model(variant, seed, **changes)
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return model
