"""Multi-head latent attention (MLA; DeepSeek-V2/V3), with an optional KV cache (shapes: ``backbone/__init__.py``;
here also R the key/value latent rank, Q the query latent rank, N per-head dims without rotary positions,
P2 rotary dims, W per-head value dims).

1. queries: ``q_proj`` (x), or low rank ``q_b_proj(RMSNorm(q_a_proj(x)))``; each head's N + P2 dims;
2. keys and values from one compressed latent: ``kv_a_proj`` gives R latent dims and P2 rotary key dims
   shared by all heads; the latent is RMS-normalised and ``kv_b_proj`` expands it into each head's N key
   dims and W value dims;
3. rotary positions on the queries' and the shared key's P2 dims (``rotate_half`` layout);
4. causal attention with softmax scale (N + P2)^-0.5, times YaRN's mscale^2 under yarn rope scaling
   with ``mscale_all_dim`` (as DeepSeek-V3 and transformers' ``DeepseekV3Attention`` do).

The KV cache holds the normalised latent and the rotated shared key (R + P2 numbers per position, the
point of MLA) and expands them with ``kv_b_proj`` at every step, as transformers does.

NOTE: DeepSeek's checkpoints lay the rotary dims out in interleaved pairs (``rope_interleave: true``);
moetrain's layout pairs dim i with i + P2/2. The import permutes the rotary rows of ``q_b_proj`` /
``q_proj`` and ``kv_a_proj`` once (``moetrain/hf/families/deepseek_v3.py``), which rotates every value
exactly as the interleaved formula does, so the model has one rotary convention.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.backbone.attention import apply_rotary, attend
from moetrain.backbone.kv_cache import KVCache
from moetrain.backbone.norm import RMSNorm
from moetrain.backbone.rope import yarn_mscale
from moetrain.config.mla import MLAConfig
from moetrain.config.rope import RopeScaling, YarnRopeScaling


def mla_softmax_scale(cfg: MLAConfig, scaling: RopeScaling | None) -> float:
    """(N + P2)^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn scaling with mscale_all_dim set
    (transformers' ``yarn_apply_mscale``, the same float operations)."""
    scale = cfg.qk_head_dim ** (-0.5)
    if isinstance(scaling, YarnRopeScaling) and scaling.mscale_all_dim:
        mscale = yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


class MLAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        cfg: MLAConfig,
        rope_scaling: RopeScaling | None,
        dropout: float,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.n_heads, self.cfg = n_heads, cfg
        self.layer_idx = layer_idx  # this layer's slot in a KVCache
        self.dropout = dropout
        self.scale = mla_softmax_scale(cfg, rope_scaling)
        H, qk = n_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj = nn.Linear(d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.proj = nn.Linear(H * cfg.v_head_dim, d_model, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        mask_B1SS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """1. queries; 2. latent + shared rotary key; 3. rotate; 4. append the latent to the cache;
        5. expand keys and values; 6. causal attention over every cached and new position, or, given
        ``mask_B1SS`` (packed samples, no cache: ``backbone/packing.py``), where it allows."""
        B, S, _ = x_BSD.shape
        c, H = self.cfg, self.n_heads
        N, P2, W, R = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        q = self.q_proj(x_BSD) if c.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        q_nope_BHSN, q_rot_BHSP = q.view(B, S, H, N + P2).transpose(1, 2).split([N, P2], dim=-1)
        latent_BSR, k_rot_BSP = self.kv_a_proj(x_BSD).split([R, P2], dim=-1)
        latent_B1SR = self.kv_a_norm(latent_BSR)[:, None]
        k_rot_B1SP = k_rot_BSP[:, None]
        if rotary is not None:
            q_rot_BHSP = apply_rotary(q_rot_BHSP, *rotary)
            k_rot_B1SP = apply_rotary(k_rot_B1SP, *rotary)
        past = cache.length if cache is not None else 0
        if cache is not None:  # NOTE: the cache's "keys" are the latents, its "values" the rotated shared keys
            latent_B1SR, k_rot_B1SP = cache.append(self.layer_idx, latent_B1SR, k_rot_B1SP)
        P = latent_B1SR.shape[2]  # positions attended to: cached + new
        kv_BHPX = self.kv_b_proj(latent_B1SR[:, 0]).view(B, P, H, N + W).transpose(1, 2)
        k_nope_BHPN, v_BHPW = kv_BHPX.split([N, W], dim=-1)
        k_BHPA = torch.cat([k_nope_BHPN, k_rot_B1SP.expand(B, H, P, P2)], dim=-1)
        q_BHSA = torch.cat([q_nope_BHSN, q_rot_BHSP], dim=-1)
        mask = mask_B1SS
        if past and S > 1:  # new queries after cached keys: SDPA's is_causal aligns to the top left
            keys = torch.arange(P, device=x_BSD.device)
            mask = keys[None, :] <= (past + torch.arange(S, device=x_BSD.device))[:, None]
        y_BHSW = attend(
            q_BHSA,
            k_BHPA,
            v_BHPW,
            attn_mask=mask,
            is_causal=not past and S > 1 and mask_B1SS is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.proj(y_BHSW.transpose(1, 2).reshape(B, S, H * W))
