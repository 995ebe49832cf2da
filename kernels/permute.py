"""Token permute / unpermute: expert-contiguous order for the grouped GEMM, and the weighted combine.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``; here B counts blocks of the Triton grid.

A routing map assigns each (token, slot) pair a row of the permuted buffer: rows of expert e are
contiguous and ordered by token (stable), and expert e's rows start at sum(counts[:e]), so the
grouped GEMM's offsets are ``cumsum(counts)``. With a capacity, slots past an expert's capacity are
dropped (row -1) and the rows after sum(counts) are unused (zero). Shapes never depend on the routing,
so nothing here syncs with the host.

Three things side by side: the plain PyTorch ``*_reference`` functions (the CPU path and the test
oracle), the Triton kernels with their launchers, and one autograd op per differentiable concern
(:class:`_PermuteFn`, :class:`_UnpermuteFn`). :func:`routing_map`, :func:`permute` and
:func:`unpermute` are the Triton entry points.
"""

from __future__ import annotations

import torch

from moetrain.kernels.runtime import runs_on_triton, tl, triton


def routing_map_reference(
    expert_ids_TK: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rows_TK int64, -1 where dropped; counts_E int64 of kept slots per expert).

    1. stable sort of the flat expert ids -> slots grouped by expert, in token order.
    2. position of each slot inside its expert = sorted index - start of that expert.
    3. with a capacity, keep positions < capacity (earlier tokens win), and pack kept rows.
    """
    flat_N = expert_ids_TK.reshape(-1)
    n = flat_N.numel()
    order_N = torch.sort(flat_N, stable=True).indices
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_N.device)
    counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_experts_N = flat_N[order_N]
    pos_N = torch.arange(n, device=flat_N.device) - starts_E[sorted_experts_N]
    if capacity is None:
        rows_sorted_N = torch.arange(n, device=flat_N.device)
    else:
        counts_E = counts_E.clamp(max=capacity)
        kept_starts_E = torch.cumsum(counts_E, 0) - counts_E
        rows_sorted_N = torch.where(
            pos_N < capacity, kept_starts_E[sorted_experts_N] + pos_N, torch.full_like(pos_N, -1)
        )
    rows_N = torch.empty_like(rows_sorted_N)
    rows_N[order_N] = rows_sorted_N
    return rows_N.view_as(expert_ids_TK), counts_E


def permute_reference(x_TD: torch.Tensor, rows_TK: torch.Tensor) -> torch.Tensor:
    """Copy token t into each of its kept rows; returns x_ND with N = T*K (unused rows zero).

    1. invert the map: the token of every row (T, a zero row appended to x, for unused rows).
    2. one gather of the padded x by that token.
    """
    num_tokens, k = rows_TK.shape
    n = num_tokens * k
    rows_N = rows_TK.reshape(-1)
    tokens_N = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
    # Dropped slots write to a scratch entry past the end, sliced off: no data-dependent shapes.
    dest_N = torch.where(rows_N >= 0, rows_N, n)
    token_of_row_N = torch.full((n + 1,), num_tokens, dtype=torch.int64, device=x_TD.device)
    token_of_row_N = token_of_row_N.scatter_(0, dest_N, tokens_N)[:n]
    padded_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[-1])])
    return padded_TD.index_select(0, token_of_row_N)


# torch's CPU bmm multiplies its matrices in a scalar loop when K*D < 400 (and bf16 always goes to oneDNN)
BMM_BLAS_MIN = 400


def combine_uses_bmm(y_ND: torch.Tensor, k: int) -> bool:
    """Whether the k-term combine of ``y_ND``'s rows runs ``torch.bmm`` (a GPU, or fp32/fp64 with K*D >=
    400, where the CPU bmm runs BLAS) rather than :class:`_WeightedSum`."""
    return y_ND.is_cuda or (y_ND.dtype in (torch.float32, torch.float64) and k * y_ND.shape[-1] >= BMM_BLAS_MIN)


def unpermute_reference(y_ND: torch.Tensor, rows_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order: out[t] = sum_k gates[t,k] * y[rows[t,k]] (kept only).

    The gates are cast to y's dtype first. The K-term sum: for K = 1 a plain product; one batched
    [1, K] x [K, D] product where ``torch.bmm`` runs BLAS (a GPU, or fp32/fp64 with K*D >= 400);
    otherwise :class:`_WeightedSum` (bench/combine.py, one thread: 3.0-3.1x bmm's speed at K*D < 400 in
    fp32, 1.4-3.0x in bf16; 0.77-1.21x where bmm runs BLAS in fp32, so bmm stays there).
    """
    num_tokens, k = rows_TK.shape
    gathered_TKD = y_ND.index_select(0, rows_TK.clamp_min(0).reshape(-1)).view(num_tokens, k, y_ND.shape[-1])
    weights_TK = torch.where(rows_TK >= 0, gates_TK.to(y_ND.dtype), 0)
    if k == 1:
        return gathered_TKD[:, 0] * weights_TK
    if combine_uses_bmm(y_ND, k):
        return torch.bmm(weights_TK.unsqueeze(1), gathered_TKD).squeeze(1)
    return _WeightedSum.apply(gathered_TKD, weights_TK)


class _WeightedSum(torch.autograd.Function):
    """``out[t] = sum_k w[t,k] * y[t,k]`` on the CPU without ``torch.bmm`` of T [1, K] x [K, D] products.

    Why: below K*D = 400 the CPU ``bmm`` multiplies each tiny matrix in a scalar loop (1024 tokens, K = 2,
    D = 128, fp32: 0.61 ms forward and 1.02 ms for y's gradient, against 0.04 and 0.05 ms here), and in
    bf16 it goes through oneDNN, slow at every D (bench/combine.py). Forward: K fused multiply-adds into
    one T x D tensor. Backward: y's gradient one broadcast product; the gates' gradient (a dot product
    per slot) ``bmm`` of [1, D] x [D, K] in fp32 and fp64, ``vecdot`` otherwise.
    """

    @staticmethod
    def forward(ctx, y_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_TKD, w_TK)
        out_TD = y_TKD[:, 0] * w_TK[:, :1]
        for slot in range(1, y_TKD.shape[1]):
            out_TD.addcmul_(y_TKD[:, slot], w_TK[:, slot : slot + 1])
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_TKD, w_TK = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_TD.unsqueeze(1) * w_TK.unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            if y_TKD.dtype in (torch.float32, torch.float64):
                grad_w = torch.bmm(grad_TD.unsqueeze(1), y_TKD.transpose(1, 2)).squeeze(1)
            else:
                grad_w = torch.linalg.vecdot(y_TKD, grad_TD.unsqueeze(1))
        return grad_y, grad_w


# ----------------------------------------------------------------------------------------------
# Routing map: two passes over the flat slots, no sort. Pass 1 counts each block's slots per
# expert; a cumsum over blocks gives every block its first position inside each expert; pass 2
# ranks each slot among the earlier slots of its expert in its block (a cumsum of a one-hot tile).


@triton.jit
def _block_counts_kernel(
    ids_ptr,  # [N] int64 expert of each slot
    partial_ptr,  # out [B, E] int32
    N,
    E,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    n_N = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    e_E = tl.arange(0, BLOCK_E)
    id_N = tl.load(ids_ptr + n_N, mask=n_N < N, other=-1)
    counts_E = tl.sum((id_N[:, None] == e_E[None, :]).to(tl.int32), axis=0)
    tl.store(partial_ptr + pid * E + e_E, counts_E, mask=e_E < E)


@triton.jit
def _rows_kernel(
    ids_ptr,  # [N] int64
    block_first_ptr,  # [B, E] int64: position inside expert e of this block's first slot of e
    starts_ptr,  # [E] int64: first row of expert e (counting kept rows only)
    rows_ptr,  # out [N] int64
    N,
    E,
    capacity,
    HAS_CAPACITY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    n_N = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    e_E = tl.arange(0, BLOCK_E)
    ok_N = n_N < N
    id_N = tl.load(ids_ptr + n_N, mask=ok_N, other=-1)
    hit_NE = (id_N[:, None] == e_E[None, :]).to(tl.int32)
    # Rank of each slot among this block's slots of the same expert, in slot (= token) order.
    rank_N = tl.sum(tl.cumsum(hit_NE, axis=0) * hit_NE, axis=1) - 1
    safe_id_N = tl.where(ok_N, id_N, 0)
    pos_N = tl.load(block_first_ptr + pid * E + safe_id_N, mask=ok_N, other=0) + rank_N
    row_N = tl.load(starts_ptr + safe_id_N, mask=ok_N, other=0) + pos_N
    if HAS_CAPACITY:
        row_N = tl.where(pos_N < capacity, row_N, -1)
    tl.store(rows_ptr + n_N, row_N, mask=ok_N)


def _routing_map_triton(
    expert_ids_TK: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    flat_N = expert_ids_TK.reshape(-1).to(torch.int64).contiguous()
    n = flat_N.numel()
    block_e = triton.next_power_of_2(num_experts)
    block_n = max(16, min(1024, 8192 // block_e))
    grid = (triton.cdiv(n, block_n),)
    partial_BE = torch.empty(grid[0], num_experts, dtype=torch.int32, device=flat_N.device)
    _block_counts_kernel[grid](flat_N, partial_BE, n, num_experts, BLOCK_N=block_n, BLOCK_E=block_e)
    # NOTE: these few [B, E] / [E] ops replace a sort; none of them reads a value on the host.
    ends_BE = torch.cumsum(partial_BE, 0, dtype=torch.int64)
    block_first_BE = ends_BE - partial_BE
    counts_E = ends_BE[-1]
    if capacity is not None:
        counts_E = counts_E.clamp(max=capacity)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rows_N = torch.empty_like(flat_N)
    _rows_kernel[grid](
        flat_N, block_first_BE, starts_E, rows_N, n, num_experts, capacity if capacity is not None else 0,
        HAS_CAPACITY=capacity is not None, BLOCK_N=block_n, BLOCK_E=block_e,
    )  # fmt: skip
    return rows_N.view(expert_ids_TK.shape), counts_E


# ----------------------------------------------------------------------------------------------
# Permute / unpermute. Both kernels are token-major: a program owns BLOCK_T tokens and walks D in
# BLOCK_D chunks. Rows of the permuted buffer are unique, so every write has one writer: no atomics.


@triton.jit
def _scatter_rows_kernel(
    src_ptr,  # [T, D]: x (permute) or grad_out (unpermute backward)
    rows_ptr,  # [T, K] int64
    scale_ptr,  # [T, K] fp32 gates (read only when HAS_SCALE)
    dot_ptr,  # [N, D] y of the forward (read only when HAS_DOT)
    out_ptr,  # out [N, D]: out[rows[t, k]] = scale[t, k] * src[t]; unused rows zero
    dot_out_ptr,  # out [T, K] fp32: <src[t], dot[rows[t, k]]> (written only when HAS_DOT)
    used_ptr,  # [1] int64: number of kept rows; rows >= used are zeroed
    T,
    D,
    stride_src,
    stride_dot,
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t_T = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok_T = t_T < T
    k_K = tl.arange(0, BLOCK_K)
    # NOTE: kept rows are exactly [0, used) (the routing map packs them), so the rows this program
    # zeroes (its share [pid*BLOCK_T*K, (pid+1)*BLOCK_T*K) of the unused tail) never collide with a
    # row another program writes a token to.
    used = tl.load(used_ptr)
    dot_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_D = d0 + tl.arange(0, BLOCK_D)
        d_ok_D = d_D < D
        x_TD = tl.load(
            src_ptr + t_T[:, None] * stride_src + d_D[None, :],
            mask=t_ok_T[:, None] & d_ok_D[None, :],
            other=0.0,
        )
        for j in tl.static_range(K):
            r_T = tl.load(rows_ptr + t_T * K + j, mask=t_ok_T, other=-1)
            ok_TD = (r_T >= 0)[:, None] & d_ok_D[None, :]
            v_TD = x_TD
            if HAS_SCALE:
                v_TD = x_TD.to(tl.float32) * tl.load(scale_ptr + t_T * K + j, mask=t_ok_T, other=0.0)[:, None]
            tl.store(out_ptr + r_T[:, None] * D + d_D[None, :], v_TD.to(out_ptr.dtype.element_ty), mask=ok_TD)
            if HAS_DOT:
                y_TD = tl.load(dot_ptr + r_T[:, None] * stride_dot + d_D[None, :], mask=ok_TD, other=0.0)
                part_T = tl.sum(x_TD.to(tl.float32) * y_TD.to(tl.float32), axis=1)
                dot_TK = tl.where(k_K[None, :] == j, dot_TK + part_T[:, None], dot_TK)
        for j in tl.static_range(K):
            z_T = (pid * BLOCK_T * K + j * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            z_ok_TD = ((z_T >= used) & (z_T < T * K))[:, None] & d_ok_D[None, :]
            zeros_TD = tl.zeros((BLOCK_T, BLOCK_D), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + z_T[:, None] * D + d_D[None, :], zeros_TD, mask=z_ok_TD)
    if HAS_DOT:
        tl.store(dot_out_ptr + t_T[:, None] * K + k_K[None, :], dot_TK, mask=t_ok_T[:, None] & (k_K < K)[None, :])


@triton.jit
def _gather_rows_kernel(
    src_ptr,  # [N, D]: y (unpermute) or grad_out (permute backward)
    rows_ptr,  # [T, K] int64
    weight_ptr,  # [T, K] fp32 gates (read only when HAS_WEIGHT; else every weight is 1)
    out_ptr,  # out [T, D]: sum over kept k of weight[t, k] * src[rows[t, k]], accumulated in fp32
    T,
    D,
    stride_src,
    K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    t_T = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok_T = t_T < T
    for d0 in range(0, D, BLOCK_D):
        d_D = d0 + tl.arange(0, BLOCK_D)
        d_ok_D = d_D < D
        acc_TD = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(K):
            r_T = tl.load(rows_ptr + t_T * K + j, mask=t_ok_T, other=-1)
            ok_TD = (r_T >= 0)[:, None] & d_ok_D[None, :]
            y_TD = tl.load(src_ptr + r_T[:, None] * stride_src + d_D[None, :], mask=ok_TD, other=0.0)
            if HAS_WEIGHT:
                w_T = tl.load(weight_ptr + t_T * K + j, mask=t_ok_T, other=0.0)
                acc_TD += y_TD.to(tl.float32) * w_T[:, None]
            else:
                acc_TD += y_TD.to(tl.float32)
        out_ptrs = out_ptr + t_T[:, None] * D + d_D[None, :]
        tl.store(out_ptrs, acc_TD.to(out_ptr.dtype.element_ty), mask=t_ok_T[:, None] & d_ok_D[None, :])


def _row_blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): whole rows up to 1024 wide, a tile of about 4K elements per program."""
    block_d = min(1024, triton.next_power_of_2(dim))
    return max(1, 4096 // block_d), block_d


def _scatter_rows(
    src_TD: torch.Tensor,
    rows_TK: torch.Tensor,
    out_dtype: torch.dtype,
    scale_TK: torch.Tensor | None = None,
    dot_ND: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_tokens, k = rows_TK.shape
    dim = src_TD.shape[-1]
    out_ND = torch.empty(num_tokens * k, dim, dtype=out_dtype, device=src_TD.device)
    dot_TK = torch.empty(num_tokens, k, dtype=torch.float32, device=src_TD.device) if dot_ND is not None else None
    used = (rows_TK >= 0).sum().reshape(1)  # on the device
    block_t, block_d = _row_blocks(dim)
    _scatter_rows_kernel[(triton.cdiv(num_tokens, block_t),)](
        src_TD, rows_TK, scale_TK if scale_TK is not None else src_TD,
        dot_ND if dot_ND is not None else src_TD, out_ND, dot_TK if dot_TK is not None else src_TD, used,
        num_tokens, dim, src_TD.stride(0), dot_ND.stride(0) if dot_ND is not None else 0,
        K=k, HAS_SCALE=scale_TK is not None, HAS_DOT=dot_ND is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(k),
    )  # fmt: skip
    return out_ND, dot_TK


def _gather_rows(
    src_ND: torch.Tensor, rows_TK: torch.Tensor, out_dtype: torch.dtype, weight_TK: torch.Tensor | None = None
) -> torch.Tensor:
    num_tokens, k = rows_TK.shape
    dim = src_ND.shape[-1]
    out_TD = torch.empty(num_tokens, dim, dtype=out_dtype, device=src_ND.device)
    block_t, block_d = _row_blocks(dim)
    _gather_rows_kernel[(triton.cdiv(num_tokens, block_t),)](
        src_ND, rows_TK, weight_TK if weight_TK is not None else src_ND, out_TD,
        num_tokens, dim, src_ND.stride(0),
        K=k, HAS_WEIGHT=weight_TK is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return out_TD


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows with a stride and columns densely."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _PermuteFn(torch.autograd.Function):
    """x_TD -> x_ND (each token read once, written to its kept rows); backward sums the k rows."""

    @staticmethod
    def forward(ctx, x_TD, rows_TK):  # type: ignore[override]
        ctx.save_for_backward(rows_TK)
        return _scatter_rows(x_TD, rows_TK, x_TD.dtype)[0]

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        (rows_TK,) = ctx.saved_tensors
        return _gather_rows(_rows_contiguous(grad_ND), rows_TK, grad_ND.dtype), None


class _UnpermuteFn(torch.autograd.Function):
    """(y_ND, gates_TK) -> y_TD, a gather-and-sum per token; backward scatters the gated gradient."""

    @staticmethod
    def forward(ctx, y_ND, rows_TK, gates_TK):  # type: ignore[override]
        gates_TK = gates_TK.float().contiguous()
        ctx.save_for_backward(y_ND, rows_TK, gates_TK)
        return _gather_rows(y_ND, rows_TK, y_ND.dtype, gates_TK)

    @staticmethod
    def backward(ctx, grad_TD):  # type: ignore[override]
        y_ND, rows_TK, gates_TK = ctx.saved_tensors
        need_y, _, need_gates = ctx.needs_input_grad
        grad_ND, grad_gates_TK = _scatter_rows(
            _rows_contiguous(grad_TD), rows_TK, y_ND.dtype, gates_TK, y_ND if need_gates else None
        )
        return grad_ND if need_y else None, None, grad_gates_TK


def routing_map(
    expert_ids_TK: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton entry point, same contract as :func:`routing_map_reference`, without a sort.

    1. kernel: each block's slot count per expert -> partial [B, E].
    2. cumsum over blocks -> each block's first position inside every expert; totals -> counts (and,
       with a capacity, the kept counts) -> expert starts. Small [B, E] / [E] device ops.
    3. kernel: row = start of the expert + block's first position + rank inside the block; -1 past
       the capacity.
    """
    if not runs_on_triton(expert_ids_TK) or expert_ids_TK.numel() == 0:
        return routing_map_reference(expert_ids_TK, num_experts, capacity)
    return _routing_map_triton(expert_ids_TK, num_experts, capacity)


def permute(x_TD: torch.Tensor, rows_TK: torch.Tensor) -> torch.Tensor:
    """Triton entry point, same contract as :func:`permute_reference`."""
    if not runs_on_triton(x_TD) or rows_TK.numel() == 0:
        return permute_reference(x_TD, rows_TK)
    return _PermuteFn.apply(_rows_contiguous(x_TD), rows_TK.contiguous())


def unpermute(y_ND: torch.Tensor, rows_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """Triton entry point, same contract as :func:`unpermute_reference` (fp32 accumulation)."""
    if not runs_on_triton(y_ND) or rows_TK.numel() == 0:
        return unpermute_reference(y_ND, rows_TK, gates_TK)
    return _UnpermuteFn.apply(_rows_contiguous(y_ND), rows_TK.contiguous(), gates_TK)
