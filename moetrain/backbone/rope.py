"""Rotary-position frequencies, unscaled or scaled (``model.rope_scaling``), in fp32.

Each kind computes what Hugging Face ``transformers``' ``ROPE_INIT_FUNCTIONS`` computes (its
``modeling_rope_utils.py``, same operations in the same order, so the inverse frequencies are equal bit
for bit; ``tests/test_rope.py``): the inverse frequency of each rotated pair, and the attention factor
that multiplies cos and sin (1 except for yarn). ``dim`` is the number of rotated dims (the head dim,
or multi-head latent attention's rotary part).

NOTE: computed from the config on every call, never kept in a buffer: a buffer would be cast with the
model (bf16 rounds the frequencies) and would land in checkpoints although the config determines it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moetrain.config.rope import LinearRopeScaling, Llama3RopeScaling, RopeScaling, YarnRopeScaling


@dataclass(frozen=True)
class RopeFrequencies:
    inv_freq: torch.Tensor  # [dim / 2] fp32
    attention_factor: float  # multiplies cos and sin


def default_inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (theta ** (exponent / dim))


def rope_frequencies(
    dim: int, theta: float, scaling: RopeScaling | None = None, device: torch.device | None = None
) -> RopeFrequencies:
    """The inverse frequencies and the cos/sin factor of ``scaling`` (None: plain rotary positions)."""
    if scaling is None:
        return RopeFrequencies(default_inv_freq(dim, theta, device), 1.0)
    if isinstance(scaling, LinearRopeScaling):
        inv_freq = default_inv_freq(dim, theta, device)
        inv_freq /= scaling.factor
        return RopeFrequencies(inv_freq, 1.0)
    if isinstance(scaling, YarnRopeScaling):
        return _yarn(dim, theta, scaling, device)
    if isinstance(scaling, Llama3RopeScaling):
        return RopeFrequencies(_llama3(dim, theta, scaling, device), 1.0)
    raise TypeError(f"no rotary scaling {type(scaling).__name__}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: YarnRopeScaling, device: torch.device | None) -> RopeFrequencies:
    """YaRN (Peng et al., 2023): each frequency interpolated (divided by factor), extrapolated (kept), or
    blended by a linear ramp over the dims between the correction range of beta_fast and beta_slow."""
    factor = s.factor
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = s.beta_fast or 32
    beta_slow = s.beta_slow or 1

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over the context
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return RopeFrequencies(inv_freq, attention_factor)


def _llama3(dim: int, theta: float, s: Llama3RopeScaling, device: torch.device | None) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by factor, high ones kept, the band between smoothly blended."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    old_context_len = s.original_max_position_embeddings
    low_freq_wavelen = old_context_len / s.low_freq_factor
    high_freq_wavelen = old_context_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / s.factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rotary_cos_sin(positions_S: torch.Tensor, freqs: RopeFrequencies) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, dim] in fp32, each half the same (Hugging Face's ``rotate_half`` layout), times the
    attention factor. Positions [B, S] (packed samples, each from 0) give [B, S, dim]."""
    inv_freq = freqs.inv_freq.to(positions_S.device)
    freqs_SA2 = positions_S.float()[..., None] * inv_freq
    emb_SA = torch.cat([freqs_SA2, freqs_SA2], dim=-1)
    if freqs.attention_factor == 1.0:
        return emb_SA.cos(), emb_SA.sin()
    return emb_SA.cos() * freqs.attention_factor, emb_SA.sin() * freqs.attention_factor
