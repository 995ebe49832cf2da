"""Tiny random Hugging Face MoE models built offline with transformers' own classes, and the same
models converted into moetrain through the family rules (tests/test_hf_families*.py).

Every weight is redrawn so that a swapped or dropped tensor shows in the logits: norms U(0.5, 1.5)
(not all ones), biases N(0, 0.2) (not all zeros), matrices N(0, 1/fan_in) (routers too: decisive
routing), embeddings N(0, 0.3^2) (tied, they are the output head: logits of order 1).
"""

from __future__ import annotations

import torch
import transformers

from moetrain.hf.convert import load_into, state_dict_reader
from moetrain.hf.families import family_for
from moetrain.hf.families.decoder import sections
from moetrain.model import MoETransformer

VOCAB, MAX_POS = 97, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=MAX_POS, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "default", "rope_theta": 1234.0})  # fmt: skip
SIZES = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=4),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2, num_key_value_heads=4),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      num_key_value_heads=4),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_key_value_heads=4),
}  # fmt: skip
CLASSES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
}
# Every variant the families map: (model_type, config fields besides COMMON and SIZES).
VARIANTS = {
    "mixtral": ("mixtral", dict(num_key_value_heads=2)),
    "mixtral-tied-head_dim-window": ("mixtral", dict(tie_word_embeddings=True, head_dim=12, sliding_window=MAX_POS)),
    "qwen2_moe-mlp_only": ("qwen2_moe", dict(mlp_only_layers=[1])),
    "qwen2_moe-renorm-sparse_step2-window": ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=MAX_POS, max_window_layers=3)),
    "qwen2_moe-no_qkv_bias-tied": ("qwen2_moe", dict(qkv_bias=False, tie_word_embeddings=True)),
    "qwen3_moe-head_dim-renorm-mlp_only": ("qwen3_moe", dict(head_dim=12, norm_topk_prob=True, mlp_only_layers=[0],
                                                           num_key_value_heads=2)),
    "qwen3_moe-bias-sparse_step2": ("qwen3_moe", dict(attention_bias=True, decoder_sparse_step=2)),
    "olmoe": ("olmoe", dict()),
    "olmoe-gqa-bias-clip-renorm": ("olmoe", dict(num_key_value_heads=2, attention_bias=True, clip_qkv=0.8,
                                                 norm_topk_prob=True)),
    # rotary scaling (moetrain/hf/families/rope.py), the same for every family
    "qwen3_moe-yarn": ("qwen3_moe", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1234.0, factor=4.0,
                                                               original_max_position_embeddings=16))),
    "mixtral-linear": ("mixtral", dict(rope_parameters=dict(rope_type="linear", rope_theta=1234.0, factor=2.5))),
    "olmoe-llama3": ("olmoe", dict(rope_parameters=dict(rope_type="llama3", rope_theta=1234.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=16))),
}  # fmt: skip


def hf_model(variant: str, seed: int = 0, **changes) -> transformers.PreTrainedModel:
    """The variant's tiny ``XxxForCausalLM``, every weight redrawn (see the module docstring); ``changes``:
    config fields set besides the variant's (e.g. ``vocab_size``)."""
    model_type, fields = VARIANTS[variant]
    config_cls, model_cls = CLASSES[model_type]
    config = config_cls(**{**COMMON, **SIZES[model_type], **fields, **changes})
    return redrawn(model_cls, config, seed)


def redrawn(model_cls, config, seed: int) -> transformers.PreTrainedModel:
    """``model_cls(config)`` in eval mode with every weight redrawn from ``seed``: norms U(0.5, 1.5), biases
    N(0, 0.2), embeddings N(0, 0.3^2), matrices N(0, 1/fan_in)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model


def moetrain_model(hf_config: dict) -> MoETransformer:
    """An untrained moetrain model of the sections the family maps ``hf_config`` to."""
    family = family_for(hf_config["model_type"])
    model, moe = sections(**family.to_moetrain(hf_config))
    torch.manual_seed(1)
    return MoETransformer(model, moe).eval()


def converted(hf: transformers.PreTrainedModel) -> MoETransformer:
    """The moetrain model built from ``hf``'s in-memory state dict (transformers 5's fused experts)."""
    config, tensors = hf.config.to_dict(), hf.state_dict()
    ours = moetrain_model(config)
    load_into(ours, family_for(config["model_type"]).rules(config, set(tensors)), state_dict_reader(tensors))
    return ours


def tokens(seed: int = 0, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_logit_difference(hf: transformers.PreTrainedModel, ours: MoETransformer, seeds=(0, 1, 2)) -> float:
    """Largest |logit difference| over a few random token batches (asserting the logits vary)."""
    worst = 0.0
    with torch.no_grad():
        for seed in seeds:
            x = tokens(seed)
            theirs, mine = hf(x).logits, ours(x).logits
            assert theirs.std() > 0.5, "logits too flat for a meaningful comparison"
            worst = max(worst, (theirs - mine).abs().max().item())
    return worst
