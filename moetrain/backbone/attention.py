"""Causal self-attention for both backbones, with an optional KV cache (shapes: ``backbone/__init__.py``).

gpt2: fused QKV with bias, positions come from the learned embedding (outside). llama: fused QKV
without bias (query rows, then key rows, then value rows), rotary positions on queries and keys,
``n_kv_heads`` key/value heads shared by groups of query heads. Either backbone may set the head dim
(``model.head_dim``), the projections' biases (``model.qkv_bias``, ``model.attn_out_bias``), query/key
norms (``model.qk_norm``) and a clamp of queries, keys and values (``model.clip_qkv``): what Qwen2-MoE,
Qwen3-MoE and OLMoE compute. Norms and the clamp come before rotary positions, so the KV cache holds
the keys exactly as attention reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.backbone.kv_cache import KVCache
from moetrain.backbone.norm import make_norm
from moetrain.backbone.rope import rope_frequencies, rotary_cos_sin
from moetrain.config.model import ModelConfig
from moetrain.config.rope import RopeScaling


def attend(q_BHSA: torch.Tensor, k_BHSA: torch.Tensor, v_BHSA: torch.Tensor, **sdpa_args) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **sdpa_args)``; in bf16 on the CPU, computed in fp32.

    NOTE: torch's CPU flash-attention kernel is 2-3x slower in bf16 than in fp32 (torch 2.13, 2-core AMD
    EPYC with avx512_bf16, one thread, B 8, 4 heads, S 128, head dim 32, forward + backward: 13.1 ms in
    bf16, 5.1 ms in fp32, 6.2 ms for fp32 with the casts; docs/benchmarks.md, "bf16 on the CPU"), and it
    was a third of a bf16 training step of the end-to-end LM. So bf16 queries, keys and values on the
    CPU are cast to fp32 and the output back to bf16: faster, and no less accurate. Masks are boolean
    (``backbone/packing.py``) and need no cast. Other devices and dtypes call SDPA as given.
    """
    if q_BHSA.dtype == torch.bfloat16 and q_BHSA.device.type == "cpu":
        y = F.scaled_dot_product_attention(q_BHSA.float(), k_BHSA.float(), v_BHSA.float(), **sdpa_args)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSA, **sdpa_args)


class Rotary(nn.Module):
    """Rotary position embedding, Hugging Face's ``rotate_half`` convention (first half / second half of
    each head's dims form the pairs); the frequencies, scaled or not, come from ``backbone/rope.py``."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def forward(self, positions_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [S, A], fp32 (times yarn's attention factor)."""
        freqs = rope_frequencies(self.head_dim, self.theta, self.scaling, positions_S.device)
        return rotary_cos_sin(positions_S, freqs)


def apply_rotary(x_BHSA: torch.Tensor, cos_SA: torch.Tensor, sin_SA: torch.Tensor) -> torch.Tensor:
    half = x_BHSA.shape[-1] // 2
    rotated = torch.cat([-x_BHSA[..., half:], x_BHSA[..., :half]], dim=-1)
    return (x_BHSA * cos_SA.to(x_BHSA.dtype)) + (rotated * sin_SA.to(x_BHSA.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        H, G, A = cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, A
        self.layer_idx = layer_idx  # this layer's slot in a KVCache
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * G) * A, bias=cfg.qkv_bias)
        self.proj = nn.Linear(H * A, cfg.d_model, bias=cfg.attn_out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":  # head: one norm of A dims for every head; full: over all heads at once
            self.q_norm = make_norm(cfg.norm, A if cfg.qk_norm == "head" else H * A, cfg.norm_eps)
            self.k_norm = make_norm(cfg.norm, A if cfg.qk_norm == "head" else G * A, cfg.norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.dropout = cfg.dropout

    def queries_keys_values(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project, normalise (``qk_norm``) and clamp (``clip_qkv``); rows per head, before rotary."""
        B, S, _ = x_BSD.shape
        H, G, A = self.n_heads, self.n_kv_heads, self.head_dim
        q_BSX, k_BSX, v_BSX = self.qkv(x_BSD).split([H * A, G * A, G * A], dim=-1)
        if self.qk_norm == "full":
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)
        q_BSHA, k_BSGA, v_BSGA = q_BSX.view(B, S, H, A), k_BSX.view(B, S, G, A), v_BSX.view(B, S, G, A)
        if self.qk_norm == "head":
            q_BSHA, k_BSGA = self.q_norm(q_BSHA), self.k_norm(k_BSGA)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q_BSHA, k_BSGA, v_BSGA = q_BSHA.clamp(-c, c), k_BSGA.clamp(-c, c), v_BSGA.clamp(-c, c)
        return q_BSHA.transpose(1, 2), k_BSGA.transpose(1, 2), v_BSGA.transpose(1, 2)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        mask_B1SS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """1. project to queries, keys, values (normalised, clamped); 2. rotate (llama); 3. append to the
        cache; 4. causal attention (each new position sees every cached one and the new ones up to itself),
        or, given ``mask_B1SS`` (packed samples, no cache: ``backbone/packing.py``), where it allows."""
        B, S, _ = x_BSD.shape
        H, G, A = self.n_heads, self.n_kv_heads, self.head_dim
        q_BHSA, k_BGSA, v_BGSA = self.queries_keys_values(x_BSD)
        if rotary is not None:
            q_BHSA = apply_rotary(q_BHSA, *rotary)
            k_BGSA = apply_rotary(k_BGSA, *rotary)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k_BGSA, v_BGSA = cache.append(self.layer_idx, k_BGSA, v_BGSA)
        if G != H:  # query head i reads key/value head i // (H / G)
            k_BGSA = k_BGSA.repeat_interleave(H // G, dim=1)
            v_BGSA = v_BGSA.repeat_interleave(H // G, dim=1)
        mask = mask_B1SS
        if past and S > 1:  # new queries after cached keys: SDPA's is_causal aligns to the top left
            keys = torch.arange(past + S, device=x_BSD.device)
            mask = keys[None, :] <= (past + torch.arange(S, device=x_BSD.device))[:, None]
        y_BHSA = attend(
            q_BHSA,
            k_BGSA,
            v_BGSA,
            attn_mask=mask,
            is_causal=not past and S > 1 and mask_B1SS is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y_BHSA.transpose(1, 2).reshape(B, S, H * A))
