"""Decoder-only, pre-norm transformer LM with two MoE placements and two backbones.

``model.arch``: ``gpt2`` (learned positions) or ``llama`` (rotary positions, optional grouped-query
attention); the norm, biases and FFN follow the arch unless the config overrides them (``moetrain/backbone/``).

- ``replace_ffn``: the FFN of every k-th block is an MoE layer (modern style).
- ``insert``: an extra MoE layer after chosen blocks whose experts are stacks of residual FFN
  sublayers (the StableMoE paper; docs/stablemoe.md, "Using it").
Without an ``moe`` config it is the dense baseline. The model knows nothing of parallelism: it is
built whole, and :func:`moetrain.parallel.parallelize` shards its experts afterwards.

Memory and speed options (``train.activation_checkpointing``, ``train.compile``; docs/parallelism.md):
``activation_checkpointing`` recomputes each MoE layer (``moe``) or each entry of ``layers`` (``block``)
in backward instead of keeping its activations (:func:`recompute_in_backward`);
:meth:`MoETransformer.compile_dense` compiles every block in place, the MoE layers excluded (eager).

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.backbone.attention import Attention, Rotary
from moetrain.backbone.kv_cache import KVCache
from moetrain.backbone.mla import MLAttention
from moetrain.backbone.norm import make_norm
from moetrain.backbone.packing import block_causal_mask, segment_positions
from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.config.training import ActivationCheckpointing
from moetrain.moe.layer import MoELayer, MoEOutput
from moetrain.moe.metrics import LayerStats


@dataclass(frozen=True)
class ModelOutput:
    loss: torch.Tensor | None  # lm_loss + aux_loss: what the engine backpropagates
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    logits: torch.Tensor
    moe_stats: list[LayerStats]


@contextlib.contextmanager
def _buffers_kept(moe_layers: list[MoELayer]):
    """Undo what a recompute changes in the buffers of ``moe_layers``.

    NOTE: a recompute must not repeat the forward's side effects on the model. The aux-loss-free top-k
    router adds each forward's counts to ``pending_load_E``; it is kept as the first forward left it.
    Nothing that routing *reads* changes between a forward and its backward (router state moves only
    between optimizer steps), so the recomputed routing equals the first one.
    """
    buffers = [(b, b.clone()) for m in moe_layers for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def recompute_in_backward(fn, moe_layers: list[MoELayer], *args):
    """``fn(*args)``, keeping only its inputs: backward runs it again for the activations it needs.

    Non-reentrant ``torch.utils.checkpoint`` with the RNG state preserved (dropout recomputes the same
    mask). The outputs (``MoEOutput``: aux loss, stats) are the first forward's, so they exist once and
    the aux loss's gradient flows as without checkpointing; the recompute's own outputs are dropped.

    NOTE: ``early_stop=False``: the recompute runs ``fn`` to its end on every rank. Under expert
    parallelism it re-issues the layer's all-to-alls (and StableMoE's count all-reduce); stopping at
    the last needed activation could skip a collective on one rank that another rank still calls.
    Every rank recomputes the same layers in the same (backward) order, so the collectives match.
    """
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        early_stop=False,
        context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(moe_layers)),
    )


@torch.compiler.disable  # train.compile: see MoETransformer.compile_dense
def _run_moe(moe: MoELayer, recompute: bool, x_TD: torch.Tensor, token_ids_T: torch.Tensor, S: int) -> MoEOutput:
    """The MoE layer, recomputed in backward when ``recompute`` (only in training with gradients)."""
    if recompute and moe.training and torch.is_grad_enabled():
        return recompute_in_backward(moe, [moe], x_TD, token_ids_T, S)
    return moe(x_TD, token_ids_T, S)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool = True):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff * (2 if kind == "swiglu" else 1), bias=bias)  # swiglu: [gate; up]
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm block; its FFN is dense or an MoE layer (``replace_ffn``)."""

    def __init__(self, cfg: ModelConfig, moe: MoELayer | None, layer_idx: int = 0, recompute_moe: bool = False):
        super().__init__()
        self.recompute_moe = recompute_moe  # train.activation_checkpointing: moe
        self.ln1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if cfg.mla is not None:  # model.attention: mla
            self.attn = MLAttention(cfg.d_model, cfg.n_heads, cfg.mla, cfg.rope_scaling, cfg.dropout, layer_idx)
        else:
            self.attn = Attention(cfg, layer_idx)
        self.ln2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.ffn = moe if moe is not None else DenseFFN(cfg.d_model, cfg.d_ff, cfg.ffn_type, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, h_BSD: torch.Tensor, token_ids_T: torch.Tensor, rotary=None, cache: KVCache | None = None, mask_B1SS=None
    ) -> tuple[torch.Tensor, object]:
        h_BSD = h_BSD + self.drop(self.attn(self.ln1(h_BSD), rotary, cache, mask_B1SS))
        x_BSD = self.ln2(h_BSD)
        if isinstance(self.ffn, MoELayer):
            x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
            out = _run_moe(self.ffn, self.recompute_moe, x_TD, token_ids_T, x_BSD.shape[1])
            return h_BSD + self.drop(out.y_TD.view_as(h_BSD)), out
        return h_BSD + self.drop(self.ffn(x_BSD)), None


class InsertedMoE(nn.Module):
    """An extra MoE layer between blocks: h + sum_k gate * Expert_k-branch(h).

    Stacked experts carry their own pre-LayerNorms, so they (and the router, as in the paper) see the
    raw residual stream; other expert types get a LayerNorm (RMSNorm for llama) first.
    """

    def __init__(self, cfg: ModelConfig, moe: MoELayer, pre_norm: bool, recompute_moe: bool = False):
        super().__init__()
        self.ln = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if pre_norm else nn.Identity()
        self.moe = moe
        self.recompute_moe = recompute_moe  # train.activation_checkpointing: moe

    def forward(
        self, h_BSD: torch.Tensor, token_ids_T: torch.Tensor, rotary=None, cache: KVCache | None = None, mask_B1SS=None
    ) -> tuple[torch.Tensor, object]:
        x_TD = self.ln(h_BSD).reshape(-1, h_BSD.shape[-1])
        out = _run_moe(self.moe, self.recompute_moe, x_TD, token_ids_T, h_BSD.shape[1])
        return h_BSD + out.y_TD.view_as(h_BSD), out


class MoETransformer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, moe_cfg: MoEConfig | None, activation_checkpointing: ActivationCheckpointing = "none"
    ):
        """``activation_checkpointing`` (``train.activation_checkpointing``): what backward recomputes
        instead of keeping: nothing, each MoE layer, or each entry of ``layers``. Only in training with
        gradients; evaluation and inference never recompute."""
        super().__init__()
        assert cfg.vocab_size is not None, "resolve model.vocab_size from the tokenizer first"
        self.cfg = cfg
        self.recompute_blocks = activation_checkpointing == "block"
        recompute_moe = activation_checkpointing == "moe"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        self.drop = nn.Dropout(cfg.dropout)
        moe_at = set(moe_cfg.moe_blocks(cfg.n_layers)) if moe_cfg else set()

        def new_moe(j: int) -> MoELayer:  # the j-th MoE layer (PR-MoE: its own number of experts)
            # NOTE: no overlapped exchanges in a recomputed layer: the overlap differentiates its expert
            # chunks in nested backward passes, and each would recompute the checkpointed region again.
            overlap = moe_cfg.ep_overlap and activation_checkpointing == "none"
            layer_cfg = moe_cfg.model_copy(update={"num_experts": moe_cfg.experts_of_layer(j), "ep_overlap": overlap})
            return MoELayer(layer_cfg, cfg.d_model, moe_cfg.expert_hidden or cfg.d_ff, cfg.vocab_size)

        layers: list[nn.Module] = []
        order = {block: j for j, block in enumerate(sorted(moe_at))}
        for i in range(cfg.n_layers):
            replace = moe_cfg is not None and moe_cfg.placement == "replace_ffn" and i in moe_at
            layers.append(Block(cfg, new_moe(order[i]) if replace else None, i, recompute_moe))
            if moe_cfg is not None and moe_cfg.placement == "insert" and i in moe_at:
                pre_norm = moe_cfg.expert_type != "stacked"
                layers.append(InsertedMoE(cfg, new_moe(order[i]), pre_norm, recompute_moe))
        self.layers = nn.ModuleList(layers)
        # each entry's MoE layers (what a block recompute restores); parallelize keeps these objects
        self._moe_of_layer = [[m for m in layer.modules() if isinstance(m, MoELayer)] for layer in layers]
        self.ln_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
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
        if self.cfg.embed_scale == "sqrt_d":  # the same draw, rescaled: every other weight stays as it was
            with torch.no_grad():
                self.embed.weight.mul_(self.cfg.d_model**-0.5 / std)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def compile_dense(self) -> None:
        """``torch.compile`` every entry of ``layers`` in place (``train.compile``), MoE layers excluded.

        ``Module.compile`` keeps parameter names, so checkpoints are the same with and without it. A
        dense block is one graph; an MoE block is two (norm + attention + residual + norm before the MoE
        layer, the residual after it); an inserted MoE layer the same, around its MoE layer.

        NOTE: the MoE layers stay eager (``_run_moe`` is ``torch.compiler.disable``-d, a graph break):
        routing makes their shapes data-dependent (tokens per expert, the host sync for the all-to-all
        split sizes), which would break graphs inside them and recompile. The embeddings, the final norm
        and the LM head stay eager too.
        """
        for layer in self.layers:
            layer.compile()

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segments_BS: torch.Tensor | None = None,
        loss_tokens: torch.Tensor | float | None = None,
    ) -> ModelOutput:
        """1. embed (positions continue after ``cache.length`` when decoding with a KV cache; with
        ``segments_BS`` -- rows of packed samples -- they restart at every sample and attention stays inside
        each, ``backbone/packing.py``); 2. blocks (MoE layers return their aux loss and stats); 3. LM loss
        + aux losses.

        The LM loss is the mean cross-entropy over the targets that are not -100; with ``loss_tokens`` it
        is their sum divided by ``loss_tokens`` instead (the trainer's share of the global batch's target
        tokens, ``training/masked_loss.py``)."""
        B, S = tokens_BS.shape
        token_ids_T = tokens_BS.reshape(-1)
        mask_B1SS = None
        if segments_BS is not None:
            if cache is not None:
                raise ValueError("packed samples (segments_BS) are for training and evaluation, not KV-cache decoding")
            positions = segment_positions(segments_BS)  # [B, S]
            mask_B1SS = block_causal_mask(segments_BS)
        else:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + S, device=tokens_BS.device)  # [S]
        rotary = self.rotary(positions) if self.cfg.arch == "llama" else None
        if rotary is not None and segments_BS is not None:
            rotary = (rotary[0][:, None], rotary[1][:, None])  # [B, 1, S, A]: one per row, every head
        h = self.embed(tokens_BS)
        if self.cfg.embed_scale == "sqrt_d":
            h = h * math.sqrt(self.cfg.d_model)
        h = self.drop(h + self.pos(positions) if self.cfg.arch == "gpt2" else h)
        aux = torch.zeros((), device=tokens_BS.device)
        stats: list[LayerStats] = []
        recompute = self.recompute_blocks and self.training and torch.is_grad_enabled()
        for layer, moe in zip(self.layers, self._moe_of_layer):
            if recompute:
                h, moe_out = recompute_in_backward(layer, moe, h, token_ids_T, rotary, cache, mask_B1SS)
            else:
                h, moe_out = layer(h, token_ids_T, rotary, cache, mask_B1SS)
            if moe_out is not None:
                aux = aux + moe_out.aux_loss
                stats.append(moe_out.stats)
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.ln_f(h))
        if targets_BS is None:
            return ModelOutput(None, None, aux, logits, stats)
        logits_TV, targets_T = logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1)
        if loss_tokens is None:
            lm_loss = F.cross_entropy(logits_TV, targets_T)
        else:
            lm_loss = F.cross_entropy(logits_TV, targets_T, reduction="sum") / loss_tokens
        return ModelOutput(lm_loss + aux, lm_loss, aux, logits, stats)
