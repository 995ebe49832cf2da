"""Decoder-only, pre-LayerNorm transformer LM with two MoE placements.

- ``replace_ffn``: the FFN of every k-th block is an MoE layer (modern style).
- ``insert``: an extra MoE layer after chosen blocks whose experts are stacks of residual FFN
  sublayers (the StableMoE paper; docs/stablemoe.md, "Using it").
Without an ``moe`` config it is the dense baseline. The model knows nothing of parallelism: it is
built whole, and :func:`moetrain.parallel.parallelize` shards its experts afterwards.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.metrics import LayerStats


@dataclass(frozen=True)
class ModelOutput:
    loss: torch.Tensor | None  # lm_loss + aux_loss: what the engine backpropagates
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    logits: torch.Tensor
    moe_stats: list[LayerStats]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff * (2 if kind == "swiglu" else 1))
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    """Pre-LN block; its FFN is dense or an MoE layer (``replace_ffn``)."""

    def __init__(self, cfg: ModelConfig, moe: MoELayer | None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = moe if moe is not None else DenseFFN(cfg.d_model, cfg.d_ff, cfg.ffn_type)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h_BSD: torch.Tensor, token_ids_T: torch.Tensor) -> tuple[torch.Tensor, object]:
        h_BSD = h_BSD + self.drop(self.attn(self.ln1(h_BSD)))
        x_BSD = self.ln2(h_BSD)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(x_BSD.reshape(-1, x_BSD.shape[-1]), token_ids_T)
            return h_BSD + self.drop(out.y_TD.view_as(h_BSD)), out
        return h_BSD + self.drop(self.ffn(x_BSD)), None


class InsertedMoE(nn.Module):
    """An extra MoE layer between blocks: h + sum_k gate * Expert_k-branch(h).

    Stacked experts carry their own pre-LayerNorms, so they (and the router, as in the paper) see the
    raw residual stream; other expert types get a LayerNorm first.
    """

    def __init__(self, cfg: ModelConfig, moe: MoELayer, pre_norm: bool):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model) if pre_norm else nn.Identity()
        self.moe = moe

    def forward(self, h_BSD: torch.Tensor, token_ids_T: torch.Tensor) -> tuple[torch.Tensor, object]:
        x_TD = self.ln(h_BSD).reshape(-1, h_BSD.shape[-1])
        out = self.moe(x_TD, token_ids_T)
        return h_BSD + out.y_TD.view_as(h_BSD), out


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig | None):
        super().__init__()
        assert cfg.vocab_size is not None, "resolve model.vocab_size from the tokenizer first"
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        moe_at = set(moe_cfg.moe_blocks(cfg.n_layers)) if moe_cfg else set()

        def new_moe() -> MoELayer:
            return MoELayer(moe_cfg, cfg.d_model, moe_cfg.expert_hidden or cfg.d_ff, cfg.vocab_size)

        layers: list[nn.Module] = []
        for i in range(cfg.n_layers):
            replace = moe_cfg is not None and moe_cfg.placement == "replace_ffn" and i in moe_at
            layers.append(Block(cfg, new_moe() if replace else None))
            if moe_cfg is not None and moe_cfg.placement == "insert" and i in moe_at:
                layers.append(InsertedMoE(cfg, new_moe(), pre_norm=moe_cfg.expert_type != "stacked"))
        self.layers = nn.ModuleList(layers)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and ".router" not in name and "moe." not in name:
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        """1. embed; 2. blocks (MoE layers return their aux loss and stats); 3. LM loss + aux losses."""
        B, S = tokens_BS.shape
        token_ids_T = tokens_BS.reshape(-1)
        h = self.drop(self.embed(tokens_BS) + self.pos(torch.arange(S, device=tokens_BS.device)))
        aux = torch.zeros((), device=tokens_BS.device)
        stats: list[LayerStats] = []
        for layer in self.layers:
            h, moe_out = layer(h, token_ids_T)
            if moe_out is not None:
                aux = aux + moe_out.aux_loss
                stats.append(moe_out.stats)
        logits = self.lm_head(self.ln_f(h))
        if targets_BS is None:
            return ModelOutput(None, None, aux, logits, stats)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1))
        return ModelOutput(lm_loss + aux, lm_loss, aux, logits, stats)
