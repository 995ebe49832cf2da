"""Experts held as stacked weights, computed with one grouped matmul per weight.

Legend: N rows (tokens routed here, grouped by expert), D model dim, F expert hidden dim,
L local experts.

Rows of local expert e are contiguous, in expert order; ``counts_L`` says how many. Rows after
``counts_L.sum()`` (capacity mode leaves some) belong to no expert and their output is never read.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ExpertType = Literal["gelu", "swiglu", "stacked"]


def _grouped_mm_supported(x_ND: torch.Tensor, w_LDF: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x_ND.dtype != w_LDF.dtype:
        return False
    if x_ND.is_cuda:
        major, _ = torch.cuda.get_device_capability(x_ND.device)
        if major < 9 or x_ND.dtype != torch.bfloat16:
            return False
    elif x_ND.dtype not in (torch.float32, torch.bfloat16):
        return False
    # inner dims must be 16-byte aligned for the strided kernels
    item = x_ND.element_size()
    return (x_ND.shape[-1] * item) % 16 == 0 and (w_LDF.shape[-1] * item) % 16 == 0


def grouped_matmul(
    x_ND: torch.Tensor, w_LDF: torch.Tensor, counts_L: torch.Tensor, padded: bool = False
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e], with ``torch._grouped_mm`` where supported.

    The fallback loops over experts; it needs the counts on the host (one sync), which is why the
    fused path is preferred.
    """
    if _grouped_mm_supported(x_ND, w_LDF):
        ends_L = torch.cumsum(counts_L, 0)
        if not padded:  # every row belongs to an expert
            return torch._grouped_mm(x_ND, w_LDF, offs=ends_L.to(torch.int32))
        # NOTE: torch._grouped_mm leaves the rows past the last offset (capacity mode) uninitialised, in
        # its output and in its input gradient; the loop gives zeros. Mask both ways, or garbage (even
        # NaN) reaches the per-row LayerNorm/bias parameters of stacked experts.
        valid_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < ends_L[-1])[:, None]
        y_NF = torch._grouped_mm(torch.where(valid_N1, x_ND, 0), w_LDF, offs=ends_L.to(torch.int32))
        return torch.where(valid_N1, y_NF, 0)
    return grouped_matmul_loop(x_ND, w_LDF, counts_L)


def grouped_matmul_loop(x_ND: torch.Tensor, w_LDF: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over experts (also the test oracle for the grouped path)."""
    pieces, start = [], 0
    for e, n in enumerate(counts_L.tolist()):
        pieces.append(x_ND[start : start + n] @ w_LDF[e])  # empty experts keep the autograd graph whole
        start += n
    pieces.append(x_ND.new_zeros(x_ND.shape[0] - start, w_LDF.shape[-1]))  # rows of no expert
    return torch.cat(pieces)


def row_experts(counts_L: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Local expert index of every row (rows past the last expert get the last index). No sync."""
    ends_L = torch.cumsum(counts_L, 0)
    rows_N = torch.arange(num_rows, device=counts_L.device)
    return torch.searchsorted(ends_L, rows_N, right=True).clamp_max(counts_L.numel() - 1)


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    t.copy_(torch.randn(t.shape, generator=gen) * std)


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
        first_expert: int = 0,
        num_local: int | None = None,
    ):
        """Holds experts ``first_expert .. first_expert + num_local - 1`` of ``num_experts``."""
        super().__init__()
        self.kind = kind
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.num_local = num_local = num_experts if num_local is None else num_local
        self.sublayers = sublayers if kind == "stacked" else 1
        s, L, D, F_ = self.sublayers, num_local, d_model, d_hidden
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
        base_seed = int(torch.randint(0, 2**62, (1,)).item())
        for j in range(self.num_local):
            gen = torch.Generator().manual_seed(base_seed + self.first_expert + j)

            _normal_(self.w1_SLDF[:, j], 1 / math.sqrt(d_model), gen)
            if self.kind == "swiglu":
                _normal_(self.w3_SLDF[:, j], 1 / math.sqrt(d_model), gen)
            if self.kind == "stacked":
                self.w2_SLFD[:, j].zero_()  # each expert starts as the identity (StableMoE code)
            else:
                _normal_(self.w2_SLFD[:, j], 1 / math.sqrt(d_hidden), gen)

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """``padded``: some rows past ``counts_L.sum()`` belong to no expert (capacity mode)."""

        def mm(x, w):
            return grouped_matmul(x, w, counts_L, padded)

        if self.kind != "stacked":
            # NOTE: squeeze(0), not [0]: indexing makes backward materialise a zero gradient of the
            # whole stacked weight and copy into it (a quarter of a CPU step at E=128).
            h_NF = mm(x_ND, self.w1_SLDF.squeeze(0))
            if self.kind == "swiglu":
                h_NF = F.silu(h_NF) * mm(x_ND, self.w3_SLDF.squeeze(0))
            else:
                h_NF = F.gelu(h_NF)
            return mm(h_NF, self.w2_SLFD.squeeze(0))
        rows_N = row_experts(counts_L, x_ND.shape[0])
        if padded:  # unused rows go through the per-row LayerNorm/biases too: make them exact zeros
            valid_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < counts_L.sum())[:, None]
            x_ND = torch.where(valid_N1, x_ND, 0)
        h_ND = x_ND
        for s in range(self.sublayers):
            z_ND = F.layer_norm(h_ND, h_ND.shape[-1:])
            z_ND = z_ND * self.ln_w_SLD[s][rows_N] + self.ln_b_SLD[s][rows_N]
            z_NF = F.relu(mm(z_ND, self.w1_SLDF[s]) + self.b1_SLF[s][rows_N])
            h_ND = h_ND + mm(z_NF, self.w2_SLFD[s]) + self.b2_SLD[s][rows_N]
        return h_ND - x_ND
