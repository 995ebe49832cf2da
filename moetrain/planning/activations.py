"""Activation memory of one micro-batch: what autograd keeps for backward, and backward's working set.

Each term is a formula over the shapes of one rank's micro-batch (legend: ``moetrain/moe/__init__.py``;
here also A head dim, H query heads, G key/value heads, Fd the dense FFN width, Fs the shared experts'
width, R the expert rows a rank computes, b bytes per activation element, 4 for fp32 values). The
formulas follow moetrain's code op by op (``moetrain/model.py``, ``backbone/``, ``moe/``); the comment
beside each names the op that keeps the tensor. ``tests/test_planning.py`` checks them against the
bytes the CPU allocator holds (``bench/plan_memory.py`` against a whole training step).

Kept for backward (at the end of the forward), per ``train.activation_checkpointing``:

- ``none``: every block's internals;
- ``moe``: an MoE layer keeps nothing of its own (its input, the norm's output, stays: the
  recompute needs it); backward recomputes one MoE layer at a time;
- ``block``: each block keeps only its input; backward recomputes one block at a time.

The working set is what backward adds on top, at its largest: the loss's gradient over the vocabulary
at the start of backward, or one layer's recomputed internals plus its gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.moe.row_align import ROW_MULTIPLE, cpu_bf16_row_multiple

INDEX = 8  # int64 indices (routing rows, expert ids)
F32 = 4


@dataclass(frozen=True)
class Shapes:
    """One rank's micro-batch and the model's sizes."""

    tokens: int  # T = micro_batch x seq_len
    seq_len: int
    dtype_bytes: int  # b: 2 for bf16/fp16, 4 for fp32
    model: ModelConfig
    moe: MoEConfig | None
    ep_size: int = 1
    rows_factor: float = 1.0  # R / (T*K): the busiest EP rank's received rows over the mean (>= 1)
    layer_rows_factors: tuple[float, ...] | None = None  # per MoE layer instead (a measured step)
    device: str = "cuda"  # cpu: the grouped GEMM recomputes its input instead of keeping it (experts.py)

    @property
    def T(self) -> int:  # noqa: N802 - the shape letter
        return self.tokens

    @property
    def D(self) -> int:  # noqa: N802
        return self.model.d_model


@dataclass(frozen=True)
class ActivationTerms:
    kept: dict[str, int]  # name -> bytes kept at the end of the forward
    working_set: int  # the most backward adds on top of ``kept``
    working_set_of: str  # which part of backward sets it


def _norm(s: Shapes) -> int:
    """ln1 / ln2 / ln_f: its output (read by the next op) plus what its backward needs."""
    T, D, b = s.T, s.D, s.dtype_bytes
    if s.model.norm == "layernorm":
        return T * D * b + 2 * T * F32  # output; mean and rstd (fp32)
    # RMSNorm computed in fp32 (backbone/norm.py): rstd, and x*rstd before and after the cast
    if b == F32:
        return 2 * T * D * F32 + T * F32  # x*rstd (kept by weight*), output; rstd
    return T * D * F32 + T * F32 + 2 * T * D * b  # x.float(), rstd, x*rstd cast back, output


def _attention(s: Shapes) -> int:
    """Attention's kept tensors (backbone/attention.py) plus its residual sum.

    SDPA keeps its q, k, v, output and logsumexp. Rotary multiplies by constant cos / sin, which keeps
    no activation; ``repeat_interleave`` (grouped-query attention) keeps no input. So the qkv
    projection's output stays only while a view of it reaches SDPA (q, k and v without rotary, v
    without grouped-query attention); proj reads SDPA's output, laid out [B, S, H, A] by flash
    attention, so merging the heads is a view."""
    m, T, D, b = s.model, s.T, s.D, s.dtype_bytes
    H, G = m.n_heads, m.kv_heads
    A = D // H
    B = T // s.seq_len
    rotary, grouped = m.arch == "llama", G != H
    if s.device == "cpu" and b != F32:
        # bf16 on the CPU: attention runs in fp32 (backbone/attention.py, attend). SDPA keeps fp32 copies of
        # q, k and v (k and v already repeated for the query heads) and its fp32 output; proj keeps that
        # output cast back; the bf16 q, k, v are freed once cast
        kept = 4 * T * H * A * F32 + T * H * A * b + B * H * s.seq_len * F32
        return kept + T * D * b + _dropout_masks(s, 1)
    kept = 0
    if not rotary or not grouped:
        kept += T * (H + 2 * G) * A * b  # the qkv projection's output (a view of it reaches SDPA)
    if rotary:
        kept += T * H * A * b + (0 if grouped else T * G * A * b)  # rotated q (and k, when not repeated)
    if grouped:
        kept += 2 * T * H * A * b  # k and v repeated for the query heads
    kept += T * H * A * b + B * H * s.seq_len * F32  # SDPA's output (proj's input) and logsumexp (fp32)
    kept += T * D * b  # h + attn(...): the residual stream after attention
    kept += _dropout_masks(s, 1)
    return kept


def _dropout_masks(s: Shapes, count: int) -> int:
    return count * s.T * s.D if s.model.dropout > 0 else 0  # bool masks of nn.Dropout


def _ffn(kind: str, rows: int, width: int, b: int) -> int:
    """The hidden activations of a GELU / SwiGLU MLP on ``rows`` rows (its input and output aside)."""
    if kind == "swiglu":  # up = [gate; up] (2F), silu(gate), silu(gate) * up
        return rows * width * b * 4
    return rows * width * b * 2  # up, gelu(up)


def _dense_ffn(s: Shapes) -> int:
    m = s.model
    return _ffn(m.ffn_type, s.T, m.d_ff, s.dtype_bytes) + s.T * s.D * s.dtype_bytes + _dropout_masks(s, 1)


@dataclass(frozen=True)
class MoEParts:
    router: int
    dispatch: int  # routing rows, the permuted / exchanged rows kept, the combine's input
    experts: int
    shared: int  # shared experts / Residual-MoE branch

    @property
    def total(self) -> int:
        return self.router + self.dispatch + self.experts + self.shared


def expert_rows(s: Shapes, layer: int = 0) -> int:
    """R: the rows this rank's experts compute. One process: every (token, slot) pair, T*K; under
    expert parallelism the rows it receives, ``rows_factor`` times the mean T*K (the busiest rank),
    at most what the capacity lets through and every row of the EP group."""
    moe = s.moe
    k = getattr(moe.router, "top_k", 1)
    n = s.T * k
    if s.ep_size == 1:
        return n
    factor = s.rows_factor if s.layer_rows_factors is None else s.layer_rows_factors[layer]
    if moe.capacity_factor is not None:
        factor = min(factor, moe.capacity_factor)
    return min(int(round(n * factor)), n * s.ep_size)


def moe_layer(s: Shapes, num_experts: int, layer: int = 0) -> MoEParts:
    """One MoE layer's kept tensors (moe/layer.py): router, dispatch, experts, combine, shared."""
    moe, T, D, b = s.moe, s.T, s.D, s.dtype_bytes
    k = getattr(moe.router, "top_k", 1)
    E = num_experts + moe.null_experts
    N, R = T * k, expert_rows(s, layer)
    F = moe.expert_hidden or s.model.d_ff
    # router: fp32 logits' input (a copy under bf16), the scores and the chosen ids / gates
    router = (T * D * F32 if b != F32 else 0) + T * E * F32 + T * k * (INDEX + F32)
    if getattr(moe.router, "z_loss_coeff", 0) > 0:
        router += T * E * F32 + T * F32  # logsumexp keeps the logits and its output
    # dispatch: the routing rows (kept by permute and combine) and the rows the combine gathers from
    dispatch = T * k * INDEX + N * D * b
    experts_in = 0
    if s.ep_size > 1:
        # the regroup index (received rows by local expert), and the experts' output, which undoing the
        # regroup (index_copy) keeps
        dispatch += R * INDEX + R * D * b
        experts_in = R * D * b  # the received rows, regrouped: kept by the grouped GEMMs
    elif s.device != "cpu":
        experts_in = N * D * b  # torch._grouped_mm keeps its input (the CPU path gathers it again)
    L = num_experts // s.ep_size
    rows, padding = R, 0
    if s.device == "cpu" and b != F32 and cpu_bf16_row_multiple(R, L) > 1:
        # bf16 on the CPU: the experts compute R + L * (M - 1) rows (moe/row_align.py); the padding also
        # keeps its two row maps (int64) and one R x D tensor (measured)
        rows, padding = R + L * (ROW_MULTIPLE - 1), R * D * b + R * 2 * INDEX
    experts = experts_in + _experts(moe.expert_type, rows, D, F, moe.sublayers, b) + padding
    shared = 0
    if moe.shared_experts:
        width = moe.shared_experts * (moe.shared_expert_hidden or F)
        shared = _ffn(moe.expert_type, T, width, b)
    if moe.residual:
        shared += _ffn(moe.expert_type, T, F, b) + 2 * T * D * b + T * 2 * F32 * 2
    return MoEParts(router, dispatch, experts, shared)


def _experts(kind: str, R: int, D: int, F: int, sublayers: int, b: int) -> int:
    if kind != "stacked":
        return _ffn(kind, R, F, b)
    # StableMoE's stacked sublayers (moe/experts.py): LN output and its per-row weight, the affine
    # result, relu's output, the new residual (the last one only until Expert(x) - x, which the
    # combine reads), LN statistics; and each row's expert index
    per_sublayer = 4 * R * D * b + R * F * b + 2 * R * F32
    return sublayers * per_sublayer + R * INDEX


def _loss(s: Shapes) -> tuple[int, int]:
    """(kept, working set) of the LM head and the fp32 cross entropy over the vocabulary."""
    T, V, b = s.T, s.model.vocab_size, s.dtype_bytes
    kept = T * V * b + T * V * F32  # the logits (held by the model's output) and log-softmax's output
    working = 2 * T * V * F32  # nll's and log-softmax's gradients (fp32)
    return kept, working


def _layer_backward(s: Shapes, rows: int, width: int, weight_grad: int) -> int:
    """What differentiating one MLP-like layer adds: the gradient of its hidden activation (rows x
    width) and its weight gradient (made whole before it is added to ``.grad``), less the
    log-probabilities, which backward has freed by the time it reaches a layer."""
    freed = s.T * s.model.vocab_size * F32
    return max(0, rows * width * s.dtype_bytes + weight_grad - freed)


def activation_terms(s: Shapes, recompute: str) -> ActivationTerms:
    """Kept bytes by part and backward's working set, for ``train.activation_checkpointing``."""
    m, moe = s.model, s.moe
    T, D, b = s.T, s.D, s.dtype_bytes
    moe_blocks = set(moe.moe_blocks(m.n_layers)) if moe is not None else set()
    embed = T * D * b + _dropout_masks(s, 1)
    head_kept, head_working = _loss(s)
    attn = _norm(s) + _attention(s) + _norm(s)  # ln1, attention + residual, ln2
    dense_block = attn + _dense_ffn(s)
    dense_width = m.d_ff * (2 if m.ffn_type == "swiglu" else 1)
    dense_ws = _layer_backward(s, T, m.d_ff, D * dense_width * b)
    moe_parts = [moe_layer(s, moe.experts_of_layer(j), j) for j in range(len(moe_blocks))] if moe else []
    inserted = moe is not None and moe.placement == "insert"
    moe_extra = T * D * b  # the MoE output added to the residual (a new residual stream tensor)
    if inserted and moe.expert_type != "stacked":
        moe_extra += _norm(s)  # the inserted layer's own norm
    if (
        s.device == "cpu"
        and recompute == "block"
        and moe is not None
        and moe.expert_type != "stacked"
        and s.ep_size == 1
    ):
        # NOTE: on the CPU the grouped GEMM's gather-again closure (moe/experts.py) holds the layer's
        # input and routing outside the checkpoint, so a recomputed block keeps them (measured)
        moe_extra += T * D * b + T * getattr(moe.router, "top_k", 1) * (INDEX + F32)
    largest_moe = max((p.total for p in moe_parts), default=0)
    moe_ws = 0
    for j in range(len(moe_parts)):
        F, R = moe.expert_hidden or m.d_ff, expert_rows(s, j)
        weights = moe.experts_of_layer(j) // s.ep_size * D * F * b
        if moe.expert_type == "stacked":
            # a sublayer's weight, w1_SLDF[s], is a slice: its gradient is made whole, every sublayer's
            # size, and a sublayer's backward also holds the gradients of its R x D tensors
            weights, extra = weights * moe.sublayers, 4 * R * D * b
        else:
            extra = 0
            if s.device == "cpu":  # written into buffers the experts keep (moe/grouped_cpu.py): no new memory
                weights = 0
        # the shared experts / dense branch run after the routed ones: backward has freed theirs first
        ws = max(0, _layer_backward(s, R, F, weights) + extra - moe_parts[j].shared)
        moe_ws = max(moe_ws, ws)
    layer_ws = max(dense_ws if len(moe_blocks) < m.n_layers or inserted else 0, moe_ws)
    kept: dict[str, int] = {"embeddings": embed}
    n_dense = m.n_layers - (0 if inserted else len(moe_blocks))
    if recompute == "block":
        layers = m.n_layers + (len(moe_blocks) if inserted else 0)
        kept["block inputs"] = layers * T * D * b + len(moe_parts) * (moe_extra - T * D * b)
        biggest_block = max(dense_block, attn + largest_moe + T * D * b)
        working, part = biggest_block + layer_ws, "a recomputed block and its gradients"
    else:
        kept["attention + norms"] = m.n_layers * attn
        kept["dense FFN"] = n_dense * _dense_ffn(s)
        if moe_parts and recompute != "moe":
            kept["MoE router"] = sum(p.router for p in moe_parts)
            kept["MoE dispatch + combine"] = sum(p.dispatch for p in moe_parts)
            kept["MoE experts"] = sum(p.experts for p in moe_parts)
            kept["MoE shared experts"] = sum(p.shared for p in moe_parts)
        kept["MoE outputs"] = len(moe_parts) * moe_extra
        if recompute == "moe":
            working, part = largest_moe + moe_ws, "a recomputed MoE layer and its gradients"
        else:
            working, part = layer_ws, "one layer's gradients"
    kept["final norm"] = _norm(s)
    kept["LM head + loss"] = head_kept
    if head_working >= working:
        working, part = head_working, "the loss's gradient over the vocabulary"
    return ActivationTerms({k: v for k, v in kept.items() if v}, working, part)
