"""Causal self-attention for both backbones, with an optional KV cache (shapes: ``backbone/__init__.py``).

gpt2: fused QKV with bias, positions come from the learned embedding (outside). llama: fused QKV
without bias (query rows, then key rows, then value rows), rotary positions on queries and keys,
``n_kv_heads`` key/value heads shared by groups of query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.backbone.kv_cache import KVCache
from moetrain.backbone.rope import rope_frequencies, rotary_cos_sin
from moetrain.config.rope import RopeScaling


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
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        bias: bool,
        dropout: float,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.layer_idx = layer_idx  # this layer's slot in a KVCache
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.dropout = dropout

    def forward(
        self,
        x_BSD: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """1. project to queries, keys, values; 2. rotate (llama); 3. append to the cache;
        4. causal attention (each new position sees every cached one and the new ones up to itself)."""
        B, S, _ = x_BSD.shape
        H, G, A = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * A, G * A, G * A], dim=-1)
        q_BHSA = q.view(B, S, H, A).transpose(1, 2)
        k_BGSA = k.view(B, S, G, A).transpose(1, 2)
        v_BGSA = v.view(B, S, G, A).transpose(1, 2)
        if rotary is not None:
            q_BHSA = apply_rotary(q_BHSA, *rotary)
            k_BGSA = apply_rotary(k_BGSA, *rotary)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k_BGSA, v_BGSA = cache.append(self.layer_idx, k_BGSA, v_BGSA)
        if G != H:  # query head i reads key/value head i // (H / G)
            k_BGSA = k_BGSA.repeat_interleave(H // G, dim=1)
            v_BGSA = v_BGSA.repeat_interleave(H // G, dim=1)
        mask = None
        if past and S > 1:  # new queries after cached keys: SDPA's is_causal aligns to the top left
            keys = torch.arange(past + S, device=x_BSD.device)
            mask = keys[None, :] <= (past + torch.arange(S, device=x_BSD.device))[:, None]
        y_BHSA = F.scaled_dot_product_attention(
            q_BHSA,
            k_BGSA,
            v_BGSA,
            attn_mask=mask,
            is_causal=not past and S > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y_BHSA.transpose(1, 2).reshape(B, S, H * A))
