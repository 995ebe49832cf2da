"""Experts held as stacked weights, computed with one grouped matmul per weight (shapes: moetrain/moe/__init__.py).

Rows of local expert e are contiguous, in expert order; ``counts_L`` says how many. Rows after
``counts_L.sum()`` (capacity mode leaves some) belong to no expert: they are not computed and their
output is never read (:func:`grouped_matmul`).

Where ``torch._grouped_mm`` runs, and what each device needs guarded, is one decision table
(``moetrain/moe/grouped_gemm.py``: bf16 on Hopper and Blackwell, torch's own fallback elsewhere from torch
2.9, fp32 / bf16 on the CPU; Blackwell's weight gradients of empty experts zeroed). Everywhere else the
experts fall back to a Python loop over experts, which reads the counts on the host (one sync per call):
:class:`GroupedExperts` warns once when that happens and records it (``uses_loop``, logged as
``moe/grouped_gemm_fallback_layers``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.model import ExpertType
from moetrain.moe.grouped_cpu import GradBuffers, grouped_mm_cpu
from moetrain.moe.grouped_gemm import ZeroEmptyExpertGrads, plan_here
from moetrain.moe.row_align import AlignedRows, cpu_bf16_row_multiple

ExpertInit = Literal["default", "fairseq"]


def is_expert_param(name: str) -> bool:
    """Whether a parameter (by its name in the model) belongs to a :class:`GroupedExperts`."""
    return ".experts." in f".{name}."


def grouped_mm_unsupported(x_ND: torch.Tensor, w_LDF: torch.Tensor) -> str | None:
    """None when ``torch._grouped_mm`` runs on these operands (``moetrain/moe/grouped_gemm.py``), else why not."""
    if x_ND.dtype != w_LDF.dtype:
        return f"input dtype {x_ND.dtype} differs from weight dtype {w_LDF.dtype}"
    plan = plan_here(x_ND)
    if not plan.grouped:
        return plan.why
    item = x_ND.element_size()  # inner dims must be 16-byte aligned for the strided kernels
    if (x_ND.shape[-1] * item) % 16 or (w_LDF.shape[-1] * item) % 16:
        return f"inner dims {x_ND.shape[-1]} and {w_LDF.shape[-1]} are not 16-byte aligned"
    return None


def group_ends(counts_L: torch.Tensor, padded: bool = False) -> torch.Tensor:
    """End row of each local expert's rows (int32 offsets for ``torch._grouped_mm``). No sync.

    ``padded``: rows past ``counts_L.sum()`` belong to no expert (capacity mode, null experts). When no
    row belongs to any expert, expert 0 takes row 0 (a zero row from the permute), so that row is
    computed: the combine reads row 0 for every dropped slot (times a zero gate) and must never read
    uninitialised memory, which could be NaN.
    """
    ends_L = torch.cumsum(counts_L, 0)
    if padded:
        ends_L = ends_L + (ends_L[-1:] == 0)
    return ends_L.to(torch.int32)


def grouped_matmul(
    x_ND: torch.Tensor,
    w_LDF: torch.Tensor,
    ends_L: torch.Tensor,
    recompute_x: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e], with ``torch._grouped_mm`` where supported.

    ``ends_L``: :func:`group_ends`. Rows past the last end (capacity mode) are not computed: the fused
    path leaves them uninitialised in the output and in the input gradient, the loop gives zeros.
    Nothing reads them into a weight or an output: the next grouped matmul reads only rows before the
    last end, its weight gradient too, and the combine reads only kept rows (and row 0, see
    :func:`group_ends`). So capacity mode needs no masking pass (tested by poisoning those rows with NaN).

    ``recompute_x`` (CPU): returns ``x_ND`` again; backward calls it for the weight gradient instead
    of keeping ``x_ND`` saved (:class:`_GroupedMMRecomputeX`).

    The fallback loops over experts; it needs the counts on the host (one sync), which is why the
    fused path is preferred.
    """
    if grouped_mm_unsupported(x_ND, w_LDF) is None:
        if recompute_x is not None and not x_ND.is_cuda:
            return _GroupedMMRecomputeX.apply(x_ND, w_LDF, ends_L, recompute_x)
        if plan_here(x_ND).zero_empty_expert_grads:  # Blackwell: empty experts' weight gradients are garbage
            w_LDF = ZeroEmptyExpertGrads.apply(w_LDF, torch.diff(ends_L, prepend=ends_L.new_zeros(1)))
        return torch._grouped_mm(x_ND, w_LDF, offs=ends_L)
    return grouped_matmul_loop(x_ND, w_LDF, torch.diff(ends_L, prepend=ends_L.new_zeros(1)))


class _GroupedMMRecomputeX(torch.autograd.Function):
    """``torch._grouped_mm(x, w)`` that saves no ``x``: its weight gradient gets ``x`` from ``recompute()``.

    The local dispatcher's x_ND (N x D) is a gather of the layer input x_TD, which autograd keeps
    anyway; gathering it again in backward (one N x D copy) saves N x D activations, bringing the layer
    to a gather-fused layer's saved bytes (docs/benchmarks.md, C4). The gradients are the formulas of
    ``torch._grouped_mm``'s own backward. CPU only: on CUDA the grouped GEMM's operand layouts are
    constrained, and this path has not been run there.
    """

    @staticmethod
    def forward(ctx, x_ND, w_LDF, ends_L, recompute_x):
        ctx.save_for_backward(w_LDF, ends_L)
        ctx.recompute_x = recompute_x
        return torch._grouped_mm(x_ND, w_LDF, offs=ends_L)

    @staticmethod
    def backward(ctx, grad_NF):
        w_LDF, ends_L = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_NF, w_LDF.transpose(-2, -1), offs=ends_L)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(ctx.recompute_x().t(), grad_NF, offs=ends_L)
        return grad_x, grad_w, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: ``torch._grouped_mm``'s backward rejects
    the stride-0 gradient of, for example, ``experts(x, counts).sum()``."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(y: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(y) if y.requires_grad else y


def grouped_matmul_loop(x_ND: torch.Tensor, w_LDF: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over experts (also the test oracle for the grouped path)."""
    pieces, start = [], 0
    for e, n in enumerate(counts_L.tolist()):
        pieces.append(x_ND[start : start + n] @ w_LDF[e])  # empty experts keep the autograd graph whole
        start += n
    pieces.append(x_ND.new_zeros(x_ND.shape[0] - start, w_LDF.shape[-1]))  # rows of no expert
    return torch.cat(pieces)


def row_experts(ends_L: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Local expert index of every row; rows past the last end get L (no expert). No sync."""
    rows_N = torch.arange(num_rows, device=ends_L.device, dtype=ends_L.dtype)
    return torch.searchsorted(ends_L, rows_N, right=True)


def per_row(p_LX: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """Each row's copy of its expert's vector (a LayerNorm weight or a bias): ``p_LX[rows_N]``, with
    zeros for the rows of no expert (index L), whose gradient lands in that scratch entry and is dropped.

    NOTE: the gather whose backward sums in a fixed order on each device. On the CPU the backward of
    ``p_LX[rows_N]`` (``index_put_(accumulate=True)``) adds with float atomics on several threads once
    the gradient has 32768 elements or more, so two runs of one seed drift apart; ``index_select``'s
    backward (``index_add_``) does not, and is faster. On CUDA it is the other way round:
    ``index_add_`` uses atomics and the indexing backward sorts.
    """
    p_LX = torch.cat([p_LX, p_LX.new_zeros(1, p_LX.shape[-1])])  # L x X: a few KB, not a pass over rows
    if p_LX.is_cuda:
        return p_LX[rows_N]
    return p_LX.index_select(0, rows_N)


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    t.copy_(torch.randn(t.shape, generator=gen) * std)


def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) * bound)


class GroupedExperts(nn.Module):
    """L experts of one kind. ``forward`` returns each row's expert *residual branch*.

    - ``gelu``:    W2 gelu(W1 x)                        (modern FFN replacement, no biases)
    - ``swiglu``:  W2 (silu(W1 x) * W3 x)
    - ``stacked``: the StableMoE paper's expert, ``sublayers`` residual FFN sublayers
                   ``x + W2 relu(W1 LN(x) + b1) + b2`` with their own LayerNorm and a zero-initialised
                   W2; returns Expert(x) - x, so the gate scales the summed residual branch (Eq. 7).
    """

    def __init__(
        self,
        kind: ExpertType,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        sublayers: int = 1,
        init: ExpertInit = "default",
    ):
        """Holds all ``num_experts`` experts; :meth:`shard` keeps one expert-parallel rank's share.

        ``init`` (stacked experts): ``default`` W1 ~ N(0, 1/d), biases 0, W2 = 0, so every expert starts as
        the identity; ``fairseq`` the StableMoE code's ``BaseSublayer``: torch's ``nn.Linear`` init
        (W1, b1 ~ U(+-1/sqrt(d)), b2 ~ U(+-1/sqrt(d_hidden))) with only W2 zeroed, so each sublayer starts
        as ``x + b2``.
        """
        super().__init__()
        if init != "default" and kind != "stacked":
            raise ValueError(f"expert init {init!r} is for stacked experts (got {kind!r})")
        self.kind = kind
        self.init = init
        self.num_experts = num_experts
        self.first_expert = 0  # global id of local expert 0
        self.num_local = num_experts
        self.uses_loop = False  # the last forward fell back to the per-expert loop
        self._warned: set[str] = set()
        self.sublayers = sublayers if kind == "stacked" else 1
        # CPU: where the weight gradients are written, reused across steps (moetrain/moe/grouped_cpu.py)
        self._grad_buffers = {"w1": GradBuffers(), "w2": GradBuffers(), "w3": GradBuffers()}
        s, L, D, F_ = self.sublayers, num_experts, d_model, d_hidden
        self.w1_SLDF = nn.Parameter(torch.empty(s, L, D, F_))
        self.w2_SLFD = nn.Parameter(torch.empty(s, L, F_, D))
        if kind == "swiglu":
            self.w3_SLDF = nn.Parameter(torch.empty(s, L, D, F_))
        if kind == "stacked":
            self.b1_SLF = nn.Parameter(torch.zeros(s, L, F_))
            self.b2_SLD = nn.Parameter(torch.zeros(s, L, D))
            self.ln_w_SLD = nn.Parameter(torch.ones(s, L, D))
            self.ln_b_SLD = nn.Parameter(torch.zeros(s, L, D))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise expert g from its own generator, seeded by one draw of the global RNG plus g.

        NOTE: this makes the weights of a global expert independent of how experts are sharded, so a
        single process and any expert-parallel layout start from identical models.
        """
        d_model, d_hidden = self.w1_SLDF.shape[-2], self.w1_SLDF.shape[-1]
        base_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        if self.w1_SLDF.is_meta:  # built on the meta device (moetrain.planning): shapes only, nothing to draw
            return
        for j in range(self.num_local):
            gen = torch.Generator().manual_seed(base_seed + self.first_expert + j)

            if self.init == "fairseq":  # torch.nn.Linear's init (kaiming_uniform a=sqrt(5)); only W2 is zeroed
                _uniform_(self.w1_SLDF[:, j], 1 / math.sqrt(d_model), gen)
                _uniform_(self.b1_SLF[:, j], 1 / math.sqrt(d_model), gen)
                _uniform_(self.b2_SLD[:, j], 1 / math.sqrt(d_hidden), gen)
                self.w2_SLFD[:, j].zero_()
                continue
            _normal_(self.w1_SLDF[:, j], 1 / math.sqrt(d_model), gen)
            if self.kind == "swiglu":
                _normal_(self.w3_SLDF[:, j], 1 / math.sqrt(d_model), gen)
            if self.kind == "stacked":
                self.w2_SLFD[:, j].zero_()  # each expert starts as the identity (StableMoE code)
            else:
                _normal_(self.w2_SLFD[:, j], 1 / math.sqrt(d_hidden), gen)

    @torch.no_grad()
    def shard(self, ep_rank: int, ep_size: int) -> None:
        """Keep only experts ``ep_rank * L .. (ep_rank + 1) * L - 1`` (L = E / ep_size), in place.

        Each kept expert's weights are exactly those it had in the whole layer (see
        :meth:`reset_parameters`), so the sharded model is the same model.
        """
        if self.num_local != self.num_experts:
            raise RuntimeError("GroupedExperts.shard: already sharded")
        if self.num_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"cannot take shard {ep_rank} of {ep_size} from {self.num_experts} experts")
        L = self.num_experts // ep_size
        first = ep_rank * L
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p[:, first : first + L].clone(), requires_grad=p.requires_grad))
        self.first_expert, self.num_local = first, L

    def forward(
        self,
        x_ND: torch.Tensor,
        counts_L: torch.Tensor,
        padded: bool = False,
        recompute_x: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``padded``: some rows past ``counts_L.sum()`` belong to no expert (capacity mode); their
        output is left unspecified (see :func:`grouped_matmul`). ``recompute_x``: returns ``x_ND``
        again, so backward need not keep it (the first GEMMs of GELU/SwiGLU experts)."""
        self._check_grouped_mm(x_ND)
        ends_L = group_ends(counts_L, padded)
        bf16_cpu = x_ND.dtype == torch.bfloat16 and not x_ND.is_cuda and not self.uses_loop
        multiple = cpu_bf16_row_multiple(x_ND.shape[0], self.num_local) if bf16_cpu else 1
        if multiple > 1:
            # bf16 on the CPU: every expert's rows a multiple of ``multiple`` (moe/row_align.py)
            rows = AlignedRows(ends_L, x_ND.shape[0], multiple)
            again = None if recompute_x is None else (lambda: rows.pad(recompute_x()))
            return rows.unpad(self._rows(rows.pad(x_ND), rows.ends_L, again))
        return self._rows(x_ND, ends_L, recompute_x)

    def _rows(
        self, x_ND: torch.Tensor, ends_L: torch.Tensor, recompute_x: Callable[[], torch.Tensor] | None
    ) -> torch.Tensor:
        """The experts on rows grouped by ``ends_L`` (rows past the last end: no expert)."""

        def mm(x, w, recompute=None):
            return grouped_matmul(x, w, ends_L, recompute)

        if self.kind != "stacked" and not x_ND.is_cuda and not self.uses_loop:
            return self._ffn_cpu(x_ND, ends_L, recompute_x)
        if self.kind != "stacked":
            # NOTE: squeeze(0), not [0]: indexing makes backward materialise a zero gradient of the
            # whole stacked weight and copy into it (a quarter of a CPU step at E=128).
            h_NF = mm(x_ND, self.w1_SLDF.squeeze(0), recompute_x)
            if self.kind == "swiglu":
                h_NF = F.silu(h_NF) * mm(x_ND, self.w3_SLDF.squeeze(0), recompute_x)
            else:
                h_NF = F.gelu(h_NF)
            return _contiguous_grad(mm(h_NF, self.w2_SLFD.squeeze(0)))
        rows_N = row_experts(ends_L, x_ND.shape[0])
        h_ND = x_ND
        for s in range(self.sublayers):
            z_ND = F.layer_norm(h_ND, h_ND.shape[-1:])
            z_ND = z_ND * per_row(self.ln_w_SLD[s], rows_N) + per_row(self.ln_b_SLD[s], rows_N)
            z_NF = F.relu(mm(z_ND, self.w1_SLDF[s]) + per_row(self.b1_SLF[s], rows_N))
            h_ND = h_ND + mm(z_NF, self.w2_SLFD[s]) + per_row(self.b2_SLD[s], rows_N)
        return _contiguous_grad(h_ND - x_ND)

    def _ffn_cpu(
        self, x_ND: torch.Tensor, ends_L: torch.Tensor, recompute_x: Callable[[], torch.Tensor] | None
    ) -> torch.Tensor:
        """GELU / SwiGLU experts on the CPU (:func:`grouped_mm_cpu`): the weight gradients go into
        the buffers this module keeps, and W1 and W3 share one gather of x in backward."""
        buf = self._grad_buffers
        if self.kind == "swiglu":
            first = [self.w1_SLDF.squeeze(0), self.w3_SLDF.squeeze(0)]  # squeeze: see forward's NOTE
            h1_NF, h3_NF = grouped_mm_cpu(x_ND, first, ends_L, [buf["w1"], buf["w3"]], recompute_x)
            h_NF = F.silu(h1_NF) * h3_NF
        else:
            (h_NF,) = grouped_mm_cpu(x_ND, [self.w1_SLDF.squeeze(0)], ends_L, [buf["w1"]], recompute_x)
            h_NF = F.gelu(h_NF)
        (y_ND,) = grouped_mm_cpu(h_NF, [self.w2_SLFD.squeeze(0)], ends_L, [buf["w2"]])
        return y_ND  # its backward accepts any gradient layout (no _contiguous_grad needed)

    def _check_grouped_mm(self, x_ND: torch.Tensor) -> None:
        """Record whether this forward falls back to the per-expert loop; warn once per reason (also when
        torch's grouped GEMM itself reads the group sizes on the host)."""
        why = grouped_mm_unsupported(x_ND, self.w1_SLDF)
        self.uses_loop = why is not None
        if why is None and plan_here(x_ND).host_sync:
            why = plan_here(x_ND).why
        if why is not None and why not in self._warned:
            self._warned.add(why)
            warnings.warn(
                f"moetrain: grouped GEMM unavailable or slow here ({why}); a host sync per expert matmul is slow "
                "on a GPU. Use bf16 on a Hopper or Blackwell GPU for the fused path.",
                RuntimeWarning,
                stacklevel=2,
            )
