"""Isolation: a sample's logits are the same (fp32, 1e-6) whether it runs alone or packed into a row with
others, for both backbones, multi-head latent attention and every router that routes a token by itself;
today's unmasked packing (one causal sequence, positions 0..S-1) fails the same check."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import validate_dict
from moetrain.model import MoETransformer

ATTENTION = {
    "gpt2": {"arch": "gpt2"},
    "llama": {"arch": "llama", "n_kv_heads": 1},
    "mla": {"arch": "llama", "attention": "mla", "mla": {"kv_lora_rank": 16, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8, "v_head_dim": 8, "q_lora_rank": 12}},
}  # fmt: skip
ROUTERS = {
    "topk": {"kind": "topk", "top_k": 2},
    "stablemoe": {"kind": "stablemoe"},
    "hash": {"kind": "hash"},
    "base": {"kind": "base"},
    "dense": None,
}
LENGTHS = (7, 19, 1, 11)  # four samples, one of a single token; 38 positions, a row of 40 with padding


def model_for(
    attention: str, router: str, max_seq_len: int = 64, activation_checkpointing: str = "none"
) -> MoETransformer:
    moe = None if ROUTERS[router] is None else {"num_experts": 4, "expert_hidden": 32, "router": ROUTERS[router]}
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "vocab_size": 257}
    model["max_seq_len"] = max_seq_len
    cfg = validate_dict({"model": {**model, **ATTENTION[attention]}, "moe": moe, "data": {"seq_len": 40}})
    torch.manual_seed(0)
    return MoETransformer(cfg.model, cfg.moe, activation_checkpointing).eval()


def packed_row(samples: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples one after another, then padding (token 0, a segment of its own): [1, size] each."""
    pad = size - sum(len(s) for s in samples)
    tokens = torch.cat([*samples, torch.zeros(pad, dtype=torch.long)])
    segments = torch.cat([torch.full((len(s),), k) for k, s in enumerate([*samples, torch.zeros(pad)])])
    return tokens[None], segments[None]


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_a_packed_sample_computes_what_it_computes_alone(attention, router):
    check_isolation(model_for(attention, router), torch.device("cpu"), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_on_cuda_a_packed_sample_computes_what_it_computes_alone(attention):
    """The same check through CUDA's SDPA with a mask (the memory-efficient kernel), fp32 without TF32;
    part of scripts/gpu_check.sh (the gpu-marked tests). Tolerance 1e-5: other kernels alone and packed."""
    torch.backends.cuda.matmul.allow_tf32 = False
    check_isolation(model_for(attention, "topk").cuda(), torch.device("cuda"), atol=1e-5)


@torch.no_grad()
def check_isolation(model: MoETransformer, device: torch.device, atol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(1, 97, (n,), generator=gen) for n in LENGTHS]
    tokens, segments = packed_row(samples, 40)
    other = packed_row(samples[::-1], 40)  # the same samples in another order, in a batch of two rows
    rows, row_segments = torch.cat([tokens, other[0]]).to(device), torch.cat([segments, other[1]]).to(device)
    logits = model(rows, segments_BS=row_segments).logits
    plain = model(tokens.to(device)).logits[0]  # today's packing: one causal sequence
    at, worst_plain = 0, 0.0
    for k, sample in enumerate(samples):
        alone = model(sample[None].to(device)).logits[0]
        torch.testing.assert_close(logits[0, at : at + len(sample)], alone, rtol=0, atol=atol)
        at_other = sum(len(s) for s in samples[k + 1 :])
        torch.testing.assert_close(logits[1, at_other : at_other + len(sample)], alone, rtol=0, atol=atol)
        worst_plain = max(worst_plain, float((plain[at : at + len(sample)] - alone).abs().max()))
        at += len(sample)
    assert worst_plain > 1e-2  # unmasked packing: later samples see earlier ones and positions run on


def test_packed_rows_are_for_training_not_the_kv_cache():
    from moetrain.backbone.kv_cache import KVCache

    model = model_for("llama", "topk")
    tokens, segments = packed_row([torch.tensor([1, 2, 3])], 4)
    with pytest.raises(ValueError, match="not KV-cache decoding"):
        model(tokens, segments_BS=segments, cache=KVCache(2))


@pytest.mark.parametrize("recompute", ["moe", "block"])
def test_packed_rows_under_activation_checkpointing_give_the_same_loss_and_gradients(recompute):
    """The mask travels into recomputed blocks: the same loss and gradients as without recomputing."""
    tokens, segments = packed_row([torch.arange(1, 12), torch.arange(20, 45)], 40)
    targets = torch.roll(tokens, -1, dims=1)
    runs = []
    for mode in ("none", recompute):
        model = model_for("llama", "topk", activation_checkpointing=mode).train()
        loss = model(tokens, targets, segments_BS=segments).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
