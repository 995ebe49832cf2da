"""Each expert's rows padded to a multiple of M, for bf16 grouped matmuls on the CPU (shapes: moetrain/moe/__init__.py;
P = rows of the padded buffer).

Why: bf16 matmuls on the CPU go to oneDNN, which builds a kernel for every new shape and keeps a bounded
number of them (``train.cpu_kernel_cache``). Dropless routing gives each expert a new row count almost every
step, so nearly every expert GEMM built a kernel: in a profile of the end-to-end LM's bf16 step (2-core AMD
EPYC, one thread), single per-expert weight-gradient GEMMs of a few MFLOP took 4-6 ms, and the experts'
GEMMs were 1.5x faster than fp32 instead of the 2-2.5x that bf16 GEMMs of one shape are
(docs/benchmarks.md, "bf16 on the CPU"). With every expert's rows a multiple of M the expert GEMMs see at
most P / M row counts, which the cache keeps. fp32 matmuls go to MKL, which builds nothing per shape:
they are not padded.

The price: the padding rows are computed (at most M - 1 per expert; they are zero, so they add nothing to
a weight gradient), and one gather of the experts' input and one of their output. So experts averaging
fewer than 32 rows are not padded (:func:`cpu_bf16_row_multiple`): with 128 experts of 16 rows, padding
to 32 doubled the experts' work and made a layer 25 % slower. The padded buffer has a fixed size, N + L * (M - 1) rows, so
nothing here reads the counts on the host.
"""

from __future__ import annotations

import torch

ROW_MULTIPLE = 32


def cpu_bf16_row_multiple(num_rows: int, num_experts: int) -> int:
    """32 for ``num_rows`` rows over ``num_experts`` local experts, or 1 (no padding) when the experts average
    fewer than 32 rows: there the row counts are few enough for the kernel cache, and padding to 32 would
    add as many rows again. Static: from the buffer's size, not the counts (docs/benchmarks.md, "bf16 on
    the CPU", how the multiple was chosen)."""
    return ROW_MULTIPLE if num_rows >= ROW_MULTIPLE * max(num_experts, 1) else 1


class AlignedRows:
    """Where each of the N rows of an expert-contiguous buffer goes in the padded one.

    ``ends_L``: end row of each local expert (:func:`moetrain.moe.experts.group_ends`); rows past the last
    end belong to no expert and are not copied. :attr:`ends_L` are the padded buffer's group ends.
    """

    def __init__(self, ends_L: torch.Tensor, num_rows: int, multiple: int) -> None:
        ends = ends_L.to(torch.int64)
        counts_L = torch.diff(ends, prepend=ends.new_zeros(1))
        padded_L = (counts_L + multiple - 1) // multiple * multiple
        padded_ends_L = torch.cumsum(padded_L, 0)
        self.num_padded = num_rows + ends.numel() * (multiple - 1)
        rows_N = torch.arange(num_rows, device=ends.device)
        expert_N = torch.searchsorted(ends, rows_N, right=True)  # L for rows of no expert
        shift_L = torch.cat([padded_ends_L - padded_L - (ends - counts_L), ends.new_zeros(1)])
        dest_N = rows_N + shift_L[expert_N]
        owned_N = expert_N < ends.numel()
        # rows of no expert: written to a scratch row past the end; read back from row 0, which is always
        # computed (group_ends gives expert 0 row 0 when no row belongs to any expert)
        self._write_N = torch.where(owned_N, dest_N, self.num_padded)
        self._read_N = torch.where(owned_N, dest_N, 0)
        self.ends_L = padded_ends_L.to(ends_L.dtype)

    def pad(self, x_ND: torch.Tensor) -> torch.Tensor:
        """x_PD: each expert's rows at its padded start, zeros between."""
        out = x_ND.new_zeros(self.num_padded + 1, x_ND.shape[-1])
        out.index_copy_(0, self._write_N, x_ND)
        return out[: self.num_padded]

    def unpad(self, y_PF: torch.Tensor) -> torch.Tensor:
        """y_NF: the rows back in the unpadded order (rows of no expert read padded row 0)."""
        return y_PF.index_select(0, self._read_N)
