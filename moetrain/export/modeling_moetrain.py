"""A moetrain model for Hugging Face ``transformers``, self-contained (torch and transformers only).

``moetrain export --format hf`` copies this file beside the weights and names it in ``config.json``'s
``auto_map``, so ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds the
model without moetrain installed. It recomputes moetrain's evaluation forward pass exactly (fp32):

- backbone ``gpt2`` (LayerNorm, learned positions, biases) or ``llama`` (RMSNorm, rotary positions,
  no biases, grouped-query attention or multi-head latent attention, ``model.attention: mla``; rotary
  scaling linear / yarn / llama3); dense FFN ``gelu`` or ``swiglu``; token embeddings optionally
  scaled by sqrt(d_model) (``embed_scale: sqrt_d``); attention with its own head dim, query/key/value
  and output biases set apart, query/key norms per head or over the whole projection, and a clamp of
  queries, keys and values (``head_dim``, ``qkv_bias``, ``attn_out_bias``, ``qk_norm``, ``clip_qkv``);
- MoE layers replacing block FFNs or inserted after blocks; routers ``topk`` (softmax / sigmoid,
  optional renormalisation, selection bias, group-limited choice, gate scale), ``stablemoe`` (the frozen distilled router, or the backbone scores during
  stage 1 when ``eval_routing`` is ``backbone``), ``base`` (greedy), ``hash`` (a token-id table);
  experts ``gelu``, ``swiglu`` or ``stacked`` (residual FFN sublayers with their own LayerNorms);
  shared experts, optionally scaled by a sigmoid gate (``shared_expert_gate``); dropless, or
  capacity-limited where earlier tokens win the slots.

Weights keep moetrain's names; experts are stacked tensors ``[sublayers, experts, ...]``.
No KV cache: ``generate`` recomputes the whole sequence each step (``use_cache=False``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class MoetrainConfig(PretrainedConfig):
    model_type = "moetrain"

    def __init__(self, moetrain_model: dict | None = None, moetrain_moe: dict | None = None, **kwargs) -> None:
        self.moetrain_model = moetrain_model or {}
        self.moetrain_moe = moetrain_moe
        m = self.moetrain_model
        kwargs.setdefault("vocab_size", m.get("vocab_size"))
        kwargs.setdefault("hidden_size", m.get("d_model"))
        kwargs.setdefault("num_hidden_layers", m.get("n_layers"))
        kwargs.setdefault("num_attention_heads", m.get("n_heads"))
        kwargs.setdefault("max_position_embeddings", m.get("max_seq_len"))
        kwargs["tie_word_embeddings"] = False  # the output head is written out even when tied in training
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            setattr(self, key, kwargs.pop(key))
        super().__init__(**kwargs)


def _norm(m: dict, dim: int) -> nn.Module:
    kind = m.get("norm") or ("rmsnorm" if m["arch"] == "llama" else "layernorm")
    return RMSNorm(dim, m["norm_eps"]) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=m["norm_eps"])


def _bias(m: dict, key: str = "bias") -> bool:
    """``model.bias``, or ``qkv_bias`` / ``attn_out_bias``, which follow it when null."""
    if m.get(key) is not None:
        return m[key]
    return m["bias"] if m.get("bias") is not None else m["arch"] == "gpt2"


def _head_dim(m: dict) -> int:
    return m.get("head_dim") or m["d_model"] // m["n_heads"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def _inv_freq(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin factor (moetrain/backbone/rope.py, transformers' formulas)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("kind")
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        s, old = scaling, scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / s["low_freq_factor"], inv / s["factor"], inv)
        smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = ~(wavelen < old / s["high_freq_factor"]) * ~(wavelen > old / s["low_freq_factor"])
        return torch.where(medium, smoothed, scaled), 1.0
    if kind != "yarn":
        return inv, 1.0
    s, factor = scaling, scaling["factor"]
    factor_attn = s.get("attention_factor")
    if factor_attn is None:
        ms, ms_all = s.get("mscale"), s.get("mscale_all_dim")
        factor_attn = float(_mscale(factor, ms) / _mscale(factor, ms_all)) if ms and ms_all else _mscale(factor)

    def corr(rot: float) -> float:
        return (dim * math.log(s["original_max_position_embeddings"] / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr(s.get("beta_fast") or 32), corr(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    extra = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = theta ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, factor_attn


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rotary(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None):
    inv_freq, factor = _inv_freq(head_dim, theta, scaling)
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    if factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * factor, emb.sin() * factor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, m: dict) -> None:
        super().__init__()
        self.h = m["n_heads"]
        self.g = m["n_kv_heads"] or m["n_heads"]
        self.a = _head_dim(m)
        self.qkv = nn.Linear(m["d_model"], (self.h + 2 * self.g) * self.a, bias=_bias(m, "qkv_bias"))
        self.proj = nn.Linear(self.h * self.a, m["d_model"], bias=_bias(m, "attn_out_bias"))
        self.qk_norm = m.get("qk_norm", "none")
        if self.qk_norm != "none":  # head: one norm over each head's dims; full: over the whole projection
            self.q_norm = _norm(m, self.a if self.qk_norm == "head" else self.h * self.a)
            self.k_norm = _norm(m, self.a if self.qk_norm == "head" else self.g * self.a)
        self.clip = m.get("clip_qkv")

    def forward(self, x: torch.Tensor, rotary) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.a, self.g * self.a, self.g * self.a], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, S, self.h, self.a), k.view(B, S, self.g, self.a), v.view(B, S, self.g, self.a)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = q.clamp(-self.clip, self.clip), k.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        if self.g != self.h:
            k = k.repeat_interleave(self.h // self.g, dim=1)
            v = v.repeat_interleave(self.h // self.g, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1)
        return self.proj(y.transpose(1, 2).reshape(B, S, self.h * self.a))


class MLAttention(nn.Module):
    """Multi-head latent attention (moetrain/backbone/mla.py), without a cache."""

    def __init__(self, m: dict) -> None:
        super().__init__()
        c, d, self.h = m["mla"], m["d_model"], m["n_heads"]
        self.c = c
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        if c["q_lora_rank"] is None:
            self.q_proj = nn.Linear(d, self.h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, c["q_lora_rank"], bias=False)
            self.q_a_norm = RMSNorm(c["q_lora_rank"], c["latent_norm_eps"])
            self.q_b_proj = nn.Linear(c["q_lora_rank"], self.h * qk, bias=False)
        self.kv_a_proj = nn.Linear(d, c["kv_lora_rank"] + c["qk_rope_head_dim"], bias=False)
        self.kv_a_norm = RMSNorm(c["kv_lora_rank"], c["latent_norm_eps"])
        self.kv_b_proj = nn.Linear(c["kv_lora_rank"], self.h * (c["qk_nope_head_dim"] + c["v_head_dim"]), bias=False)
        self.proj = nn.Linear(self.h * c["v_head_dim"], d, bias=False)
        self.scale = qk**-0.5
        sc = m.get("rope_scaling") or {}
        if sc.get("kind") == "yarn" and sc.get("mscale_all_dim"):
            ms = _mscale(sc["factor"], sc["mscale_all_dim"])
            self.scale = self.scale * ms * ms

    def forward(self, x: torch.Tensor, rotary) -> torch.Tensor:
        B, S, _ = x.shape
        c, H = self.c, self.h
        N, P2, W, R = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        q = self.q_proj(x) if c["q_lora_rank"] is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, S, H, N + P2).transpose(1, 2).split([N, P2], dim=-1)
        latent, k_rot = self.kv_a_proj(x).split([R, P2], dim=-1)
        q_rot, k_rot = _rotate(q_rot, *rotary), _rotate(k_rot[:, None], *rotary)
        k_nope, v = self.kv_b_proj(self.kv_a_norm(latent)).view(B, S, H, N + W).transpose(1, 2).split([N, W], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, H, S, P2)], dim=-1)
        y = F.scaled_dot_product_attention(torch.cat([q_nope, q_rot], -1), k, v, is_causal=S > 1, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, S, H * W))


class DenseFFN(nn.Module):
    def __init__(self, m: dict) -> None:
        super().__init__()
        bias = _bias(m)
        self.kind = m["ffn_type"]
        self.up = nn.Linear(m["d_model"], m["d_ff"] * (2 if self.kind == "swiglu" else 1), bias=bias)
        self.down = nn.Linear(m["d_ff"], m["d_model"], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return self.down(F.silu(a) * b)
        return self.down(F.gelu(h))


class Router(nn.Module):
    """Evaluation routing of every moetrain router: (expert ids [T, K], gates [T, K] fp32)."""

    def __init__(self, r: dict, d_model: int, num_experts: int, vocab_size: int) -> None:
        super().__init__()
        self.r = r
        self.kind = r["kind"]
        if self.kind in ("topk", "expert_choice"):
            self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        if self.kind == "topk" and r.get("bias_update_rate", 0.0) > 0:  # aux-loss-free balancing
            self.register_buffer("bias_steps_E", torch.zeros(num_experts, dtype=torch.int64))
        if self.kind == "topk" and r.get("correction_bias", False):  # an imported bias: its fp32 bits
            self.register_buffer("bias_base_E", torch.zeros(num_experts, dtype=torch.int32))
        if self.kind in ("stablemoe", "base"):
            self.centroids_ED = nn.Parameter(torch.empty(num_experts, d_model))
        if self.kind == "stablemoe":
            self.distill_embed_VR = nn.Parameter(torch.empty(vocab_size, r["distill_dim"]))
            self.distill_centroids_ER = nn.Parameter(torch.empty(num_experts, r["distill_dim"]))
            self.register_buffer("stage_buf", torch.zeros((), dtype=torch.int64))
        if self.kind == "hash":
            self.register_buffer("table_V", torch.zeros(vocab_size, dtype=torch.int64))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "expert_choice":  # each expert takes its top-C tokens of each sequence (group)
            T, E = x.shape[0], self.weight_ED.shape[0]
            C = max(1, min(group, math.ceil(self.r["capacity_factor"] * group * self.r["top_k"] / E)))
            scores = torch.softmax(x.float() @ self.weight_ED.float().t(), dim=-1)
            by_expert = scores.view(T // group, group, E).transpose(1, 2)
            picked = torch.sort(by_expert, dim=-1, descending=True, stable=True).indices[..., :C]
            chosen = torch.zeros_like(by_expert, dtype=torch.bool).scatter_(-1, picked, True)
            chosen = chosen.transpose(1, 2).reshape(T, E)
            ids = torch.arange(E, device=x.device).expand(T, E)
            return torch.where(chosen, ids, E), scores * chosen  # id E: not chosen, skipped
        if self.kind == "hash":
            ids = self.table_V[token_ids][:, None]
            return ids, torch.ones(ids.shape, dtype=torch.float32, device=x.device)
        if self.kind == "topk":
            logits = x.float() @ self.weight_ED.float().t()
            scores = torch.softmax(logits, dim=-1) if self.r["score_func"] == "softmax" else torch.sigmoid(logits)
            key, bias = scores, None  # the bias chooses, the gate stays the score
            if hasattr(self, "bias_steps_E"):
                bias = self.r["bias_update_rate"] * self.bias_steps_E.float()
            if hasattr(self, "bias_base_E"):  # an imported bias, as fp32 bits: base + rate * steps
                base = self.bias_base_E.view(torch.float32)
                bias = base if bias is None else base + bias
            if bias is not None:
                key = key + bias
            groups = self.r.get("num_groups", 1)
            if groups > 1:  # keep the experts of the topk_groups groups with the best top-2 sums
                T, E = key.shape
                best = key.view(T, groups, E // groups).topk(2, dim=-1).values.sum(-1)
                kept = torch.sort(best, dim=-1, descending=True, stable=True).indices[
                    :, : self.r["topk_groups"] or groups
                ]
                allowed = torch.zeros_like(best, dtype=torch.bool).scatter_(1, kept, True)
                key = key.masked_fill(~allowed.repeat_interleave(E // groups, dim=1), float("-inf"))
            ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, : self.r["top_k"]]
            gates = scores.gather(1, ids)
            if self.r["renormalize"]:
                gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
            return ids, gates * self.r.get("gate_scale", 1.0)
        scores = x.float() @ self.centroids_ED.float().t()
        distilled = self.kind == "stablemoe" and (int(self.stage_buf) == 1 or self.r["eval_routing"] == "distilled")
        if distilled:
            decide = F.embedding(token_ids, self.distill_embed_VR).float() @ self.distill_centroids_ER.float().t()
        else:
            decide = torch.sigmoid(scores)
        ids = torch.sort(decide, dim=-1, descending=True, stable=True).indices[:, :1]
        return ids, torch.sigmoid(scores.gather(1, ids))


class Experts(nn.Module):
    def __init__(self, moe: dict, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.kind = moe["expert_type"]
        s = moe["sublayers"] if self.kind == "stacked" else 1
        E, D, Fh = moe["num_experts"], d_model, d_hidden
        self.w1_SLDF = nn.Parameter(torch.empty(s, E, D, Fh))
        self.w2_SLFD = nn.Parameter(torch.empty(s, E, Fh, D))
        if self.kind == "swiglu":
            self.w3_SLDF = nn.Parameter(torch.empty(s, E, D, Fh))
        if self.kind == "stacked":
            self.b1_SLF = nn.Parameter(torch.zeros(s, E, Fh))
            self.b2_SLD = nn.Parameter(torch.zeros(s, E, D))
            self.ln_w_SLD = nn.Parameter(torch.ones(s, E, D))
            self.ln_b_SLD = nn.Parameter(torch.zeros(s, E, D))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's residual branch for rows x."""
        if self.kind == "gelu":
            return F.gelu(x @ self.w1_SLDF[0, e]) @ self.w2_SLFD[0, e]
        if self.kind == "swiglu":
            return (F.silu(x @ self.w1_SLDF[0, e]) * (x @ self.w3_SLDF[0, e])) @ self.w2_SLFD[0, e]
        h = x
        for s in range(self.w1_SLDF.shape[0]):
            z = F.layer_norm(h, h.shape[-1:]) * self.ln_w_SLD[s, e] + self.ln_b_SLD[s, e]
            z = F.relu(z @ self.w1_SLDF[s, e] + self.b1_SLF[s, e])
            h = h + z @ self.w2_SLFD[s, e] + self.b2_SLD[s, e]
        return h - x


class MoELayer(nn.Module):
    def __init__(self, m: dict, moe: dict) -> None:
        super().__init__()
        self.num_experts = moe["num_experts"]
        self.capacity_factor = moe["capacity_factor"]
        nulls = moe.get("null_experts", 0)  # ids E .. E+M-1: null experts, skipped below
        self.router = Router(moe["router"], m["d_model"], self.num_experts + nulls, m["vocab_size"])
        self.experts = Experts(moe, m["d_model"], moe["expert_hidden"] or m["d_ff"])
        self.residual_ffn = self.residual_coef = None
        if moe.get("residual", False):  # Residual MoE: c0 * moe + c1 * ffn, [c0, c1] = softmax(x W_c)
            self.residual_ffn = SharedExperts(moe["expert_type"], m["d_model"], moe["expert_hidden"] or m["d_ff"])
            self.residual_coef = nn.Linear(m["d_model"], 2)
        self.shared = None
        if moe.get("shared_experts", 0):  # N always-on experts as one FFN of N times the width
            width = moe["shared_experts"] * (moe["shared_expert_hidden"] or moe["expert_hidden"] or m["d_ff"])
            self.shared = SharedExperts(moe["expert_type"], m["d_model"], width, moe.get("shared_expert_gate", False))

    def forward(self, x_TD: torch.Tensor, token_ids: torch.Tensor, group: int) -> torch.Tensor:
        """Each token's gated sum of its experts' outputs; with a capacity, an expert takes its first
        ``ceil(capacity_factor * T * K / E)`` (token, slot) pairs in token order, and drops the rest."""
        ids, gates = self.router(x_TD, token_ids, group)
        T, K = ids.shape
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.capacity_factor is not None:
            capacity = max(1, math.ceil(self.capacity_factor * T * K / self.num_experts))
            flat = ids.reshape(-1)
            rank = torch.zeros_like(flat)
            for e in range(self.num_experts):
                mine = flat == e
                rank[mine] = torch.arange(int(mine.sum()), device=flat.device)
            keep = (rank < capacity).view(T, K)
        out = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            t, k = torch.nonzero((ids == e) & keep, as_tuple=True)
            if t.numel():
                y = self.experts.expert(e, x_TD[t])
                out.index_add_(0, t, y * gates[t, k].to(y.dtype)[:, None])
        if self.residual_ffn is not None:
            coef = torch.softmax(self.residual_coef(x_TD), dim=-1)
            out = out * coef[:, :1] + self.residual_ffn(x_TD) * coef[:, 1:]
        if self.shared is not None:
            out = out + self.shared(x_TD)
        return out


class SharedExperts(nn.Module):
    def __init__(self, kind: str, d_model: int, width: int, gated: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.w_in_DF = nn.Parameter(torch.empty(d_model, width * (2 if kind == "swiglu" else 1)))
        self.w_out_FD = nn.Parameter(torch.empty(width, d_model))
        self.w_gate_D1 = nn.Parameter(torch.empty(d_model, 1)) if gated else None  # sigmoid(x w) scales the output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_in_DF
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            y = (F.silu(a) * b) @ self.w_out_FD
        else:
            y = F.gelu(h) @ self.w_out_FD
        return torch.sigmoid(x @ self.w_gate_D1) * y if self.w_gate_D1 is not None else y


class Block(nn.Module):
    def __init__(self, m: dict, moe: dict | None) -> None:
        super().__init__()
        self.ln1 = _norm(m, m["d_model"])
        self.attn = MLAttention(m) if m.get("attention", "mha") == "mla" else Attention(m)
        self.ln2 = _norm(m, m["d_model"])
        self.ffn = MoELayer(m, moe) if moe is not None else DenseFFN(m)

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor, rotary) -> torch.Tensor:
        h = h + self.attn(self.ln1(h), rotary)
        x = self.ln2(h)
        if isinstance(self.ffn, MoELayer):
            return h + self.ffn(x.reshape(-1, x.shape[-1]), token_ids, h.shape[1]).view_as(h)
        return h + self.ffn(x)


class InsertedMoE(nn.Module):
    def __init__(self, m: dict, moe: dict) -> None:
        super().__init__()
        self.ln = _norm(m, m["d_model"]) if moe["expert_type"] != "stacked" else nn.Identity()
        self.moe = MoELayer(m, moe)

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor, rotary) -> torch.Tensor:
        return h + self.moe(self.ln(h).reshape(-1, h.shape[-1]), token_ids, h.shape[1]).view_as(h)


def moe_blocks(moe: dict, n_layers: int) -> list[int]:
    if moe["placement"] == "replace_ffn":
        if moe.get("layers") is not None:
            return sorted(moe["layers"])
        return [i for i in range(n_layers) if (i + 1) % moe["every"] == 0]
    return sorted(moe["insert_after"]) if moe["insert_after"] is not None else [n_layers // 2 - 1]


class MoetrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoetrainConfig
    base_model_prefix = "moetrain"
    _supports_cache_class = False

    def __init__(self, config: MoetrainConfig) -> None:
        super().__init__(config)
        m, moe = config.moetrain_model, config.moetrain_moe
        self.m = m
        self.embed = nn.Embedding(m["vocab_size"], m["d_model"])
        if m["arch"] == "gpt2":
            self.pos = nn.Embedding(m["max_seq_len"], m["d_model"])
        at = moe_blocks(moe, m["n_layers"]) if moe else []
        per_layer = moe.get("num_experts_per_layer") if moe else None  # PR-MoE's pyramid
        layer_moe = {i: dict(moe, num_experts=per_layer[j]) if per_layer else moe for j, i in enumerate(at)}
        layers: list[nn.Module] = []
        for i in range(m["n_layers"]):
            replace = moe is not None and moe["placement"] == "replace_ffn" and i in layer_moe
            layers.append(Block(m, layer_moe[i] if replace else None))
            if moe is not None and moe["placement"] == "insert" and i in layer_moe:
                layers.append(InsertedMoE(m, layer_moe[i]))
        self.layers = nn.ModuleList(layers)
        self.ln_f = _norm(m, m["d_model"])
        self.lm_head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        """Logits of every position (no padding mask: every sequence of the batch is whole)."""
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device)
        h = self.embed(input_ids)
        if self.m.get("embed_scale", "none") == "sqrt_d":
            h = h * math.sqrt(self.m["d_model"])
        rotary = None
        if self.m["arch"] == "gpt2":
            h = h + self.pos(positions)
        else:
            dim = self.m["mla"]["qk_rope_head_dim"] if self.m.get("mla") else _head_dim(self.m)
            rotary = _rotary(positions, dim, self.m["rope_theta"], self.m.get("rope_scaling"))
        token_ids = input_ids.reshape(-1)
        for layer in self.layers:
            h = layer(h, token_ids, rotary)
        logits = self.lm_head(self.ln_f(h))
        loss = None
        if labels is not None:  # Hugging Face's convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        return {"input_ids": input_ids}
