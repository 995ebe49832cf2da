"""The experts' grouped matmuls on the CPU: weight gradients written into memory the layer keeps.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

Why: ``torch._grouped_mm``'s backward returns each stacked weight gradient as a fresh tensor (E x D x
F: 64 MiB at E = 128, D = 256, F = 512). glibc serves blocks above 32 MiB with a fresh ``mmap`` and
returns them on free, so every step paid a page fault per 4 KiB page of every such gradient: at
that shape the weight-gradient GEMM took 57 ms with glibc's defaults and 31 ms with freed memory
retained (docs/benchmarks.md). Here the backward writes each expert's gradient with ``torch.mm(...,
out=)`` into a buffer of a :class:`GradBuffers` that the experts keep, so no process-wide allocator
setting is needed (``train.retain_host_memory``).

NOTE, the aliasing rule: a buffer is handed out again only when nothing else references its memory
(the storage's use count, :meth:`GradBuffers.take`). The usual cycle -- autograd makes the returned
tensor the parameter's ``.grad``, the optimizer reads it, ``zero_grad`` drops it -- reuses one
buffer; while a ``.grad`` (or any other tensor) still holds it, e.g. under gradient accumulation,
the next backward gets a second buffer and autograd adds it into ``.grad``. A gradient the caller
keeps is therefore never overwritten.

The two matmuls of a SwiGLU expert's first layer (W1 and W3) read the same rows: :func:`grouped_mm_cpu`
takes several weights and, when ``recompute_x`` is given (the local dispatcher's gather, see
``moetrain/moe/experts.py``), gathers the rows once in backward for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moetrain.kernels.host_reads import cpu_host_read

MAX_BUFFERS = 2  # per weight: the one a .grad holds under accumulation, and the one being written


class GradBuffers:
    """Host memory for one stacked weight's gradient, reused across steps (see the module NOTE)."""

    def __init__(self) -> None:
        self._storages: list[torch.UntypedStorage] = []

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped and strided like ``like`` (contiguous), on memory nothing
        else references. The returned tensor object is new, so autograd may make it a ``.grad``."""
        nbytes = like.numel() * like.element_size()
        self._storages = [s for s in self._storages if s.nbytes() == nbytes]  # a dtype or shape change
        for storage in self._storages:
            if torch._C._storage_Use_Count(storage._cdata) == 1:  # only this list holds it
                break
        else:
            storage = torch.empty(like.shape, dtype=like.dtype).untyped_storage()
            if len(self._storages) < MAX_BUFFERS:
                self._storages.append(storage)
        return torch.empty(0, dtype=like.dtype).set_(storage, 0, like.shape, like.stride())


def weight_grad_into(out_LDF: torch.Tensor, x_ND: torch.Tensor, grad_NF: torch.Tensor, sizes: list[int]) -> None:
    """``out[e] = x[rows of e].T @ grad[rows of e]`` for every local expert (zeros for an empty one).
    ``sizes``: rows per expert, then the rows of no expert (split off, never read)."""
    for x_nD, g_nF, out_DF in zip(x_ND.split(sizes), grad_NF.split(sizes), out_LDF.unbind(0)):
        torch.mm(x_nD.t(), g_nF, out=out_DF)


class _GroupedMMCPU(torch.autograd.Function):
    """``y_i = grouped(x @ w_i)`` for each weight ``w_i``; see the module docstring."""

    @staticmethod
    def forward(ctx, x_ND, ends_L, recompute_x, buffers, *w_LDF):
        ctx.recompute_x, ctx.buffers = recompute_x, buffers
        ctx.save_for_backward(ends_L, x_ND if recompute_x is None else None, *w_LDF)
        return tuple(torch._grouped_mm(x_ND, w, offs=ends_L) for w in w_LDF)

    @staticmethod
    def backward(ctx, *grad_NF):
        ends_L, x_ND, *w_LDF = ctx.saved_tensors
        grad_NF = [g if g is None or g.is_contiguous() else g.contiguous() for g in grad_NF]
        grad_x = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grad_NF, w_LDF):
                if g is not None:
                    part = torch._grouped_mm(g, w.transpose(-2, -1), offs=ends_L)
                    grad_x = part if grad_x is None else grad_x.add_(part)
        grad_w = [None] * len(w_LDF)
        wanted = [i for i, w in enumerate(w_LDF) if ctx.needs_input_grad[4 + i] and grad_NF[i] is not None]
        if wanted:
            x_ND = x_ND if x_ND is not None else ctx.recompute_x()
            with cpu_host_read():  # the offsets are host memory here: reading them syncs nothing
                ends = ends_L.tolist()
            sizes = [b - a for a, b in zip([0, *ends], ends)] + [x_ND.shape[0] - ends[-1]]
            for i in wanted:
                grad_w[i] = ctx.buffers[i].take(w_LDF[i])
                weight_grad_into(grad_w[i], x_ND, grad_NF[i], sizes)
        return (grad_x, None, None, None, *grad_w)


def grouped_mm_cpu(
    x_ND: torch.Tensor,
    w_LDF: list[torch.Tensor],
    ends_L: torch.Tensor,
    buffers: list[GradBuffers],
    recompute_x: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``torch._grouped_mm(x_ND, w, offs=ends_L)`` for each ``w`` of ``w_LDF`` (CPU tensors), one
    :class:`GradBuffers` per weight. ``recompute_x``: returns ``x_ND`` again in backward, which then
    keeps no ``x_ND``. Rows past the last end are neither computed nor read (capacity mode)."""
    if x_ND.is_cuda:
        raise ValueError("grouped_mm_cpu runs on the CPU only")
    return _GroupedMMCPU.apply(x_ND, ends_L, recompute_x, buffers, *w_LDF)
