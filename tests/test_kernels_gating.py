"""Fused gating kernel vs its PyTorch reference, forward and backward.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), so shapes stay small; `gpu`-marked tests rerun it natively at real sizes.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.kernels.gating import GatingOutput, topk_gating, topk_gating_reference
from moetrain.kernels.runtime import triton_available

requires_triton = pytest.mark.skipif(
    not triton_available(), reason="Triton cannot run: no CUDA and TRITON_INTERPRET unset at import"
)
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (score_func, renormalize, with_bias): plain softmax (Switch/GShard), renormalised softmax
# (Mixtral), sigmoid (StableMoE when K=1), renormalised sigmoid with an aux-free bias (DeepSeek-V3).
VARIANTS = [
    ("softmax", False, False),
    ("softmax", True, False),
    ("sigmoid", False, False),
    ("sigmoid", True, True),
]


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _run(fn, logits_TE: torch.Tensor, k: int, score_func: str, renorm: bool, bias_E, w_gates, w_scores):
    """Forward, then the gradients of three losses: gates only, scores only, both."""
    x = logits_TE.detach().clone().requires_grad_(True)
    out: GatingOutput = fn(x, k, score_func, renorm, bias_E)
    grads = []
    for use_gates, use_scores in ((True, False), (False, True), (True, True)):
        loss = torch.zeros(())
        if use_gates:
            loss = loss + (out.gates_TK * w_gates).sum()
        if use_scores:
            loss = loss + (out.scores_TE * w_scores).sum()
        grads.append(torch.autograd.grad(loss, x, retain_graph=True)[0])
    return out, grads


def _check_against_reference(logits_TE, k, score_func, renorm, bias_E, tol):
    num_tokens, num_experts = logits_TE.shape
    g = torch.Generator(device="cpu").manual_seed(1)
    w_gates = torch.randn(num_tokens, k, generator=g).to(logits_TE.device)
    w_scores = torch.randn(num_tokens, num_experts, generator=g).to(logits_TE.device)
    got, got_grads = _run(topk_gating, logits_TE, k, score_func, renorm, bias_E, w_gates, w_scores)
    ref, ref_grads = _run(topk_gating_reference, logits_TE, k, score_func, renorm, bias_E, w_gates, w_scores)
    assert got.expert_ids_TK.dtype == torch.int64 and got.counts_E.dtype == torch.int64
    assert got.gates_TK.dtype == torch.float32 and got.scores_TE.dtype == torch.float32
    assert torch.equal(got.expert_ids_TK, ref.expert_ids_TK)
    assert torch.equal(got.counts_E, ref.counts_E)
    torch.testing.assert_close(got.scores_TE, ref.scores_TE, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.gates_TK, ref.gates_TK, atol=1e-6, rtol=1e-5)
    for got_grad, ref_grad in zip(got_grads, ref_grads):
        assert got_grad.dtype == logits_TE.dtype
        torch.testing.assert_close(got_grad, ref_grad, **tol)
    return got


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens,num_experts", [(1, 8), (37, 8), (130, 64)])
def test_gating_matches_reference(num_tokens, num_experts, k, variant, dtype):
    # 37 and 130 tokens are not multiples of the kernel's token block (128 for E=8, 64 for E=64).
    score_func, renorm, with_bias = variant
    g = torch.Generator().manual_seed(num_tokens * 1000 + num_experts * 10 + k)
    logits_TE = (torch.randn(num_tokens, num_experts, generator=g) * 2).to(dtype)
    bias_E = torch.randn(num_experts, generator=g) * 0.05 if with_bias else None
    _check_against_reference(logits_TE, k, score_func, renorm, bias_E, _tol(dtype))


@requires_triton
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_gating_ties_pick_the_lower_expert(k, score_func):
    # Row 0: all equal -> experts 0..k-1. Row 1: experts 3, 5 and 6 tie for the best score.
    # Row 2: pairs of equal logits everywhere -> the lower id of each pair first.
    logits_TE = torch.zeros(3, 8)
    logits_TE[1, [3, 5, 6]] = 1.0
    logits_TE[2] = torch.tensor([0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 3.0])
    got = _check_against_reference(logits_TE, k, score_func, False, None, _tol(torch.float32))
    assert got.expert_ids_TK[0].tolist() == list(range(k))
    assert got.expert_ids_TK[1].tolist() == ([3, 5, 6, 0, 1, 2, 4, 7])[:k]
    assert got.expert_ids_TK[2].tolist() == ([6, 7, 2, 3, 4, 5, 0, 1])[:k]


@requires_triton
@pytest.mark.parametrize("k", [1, 2, 8])
def test_gating_all_tokens_to_one_expert_and_empty_experts(k):
    num_tokens, num_experts = 45, 16
    logits_TE = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(0)) * 0.1
    logits_TE[:, 5] += 20.0  # everyone's first choice
    logits_TE[:, 11] += 10.0  # everyone's second choice
    got = _check_against_reference(logits_TE, k, "softmax", True, None, _tol(torch.float32))
    assert got.counts_E[5] == num_tokens
    assert int(got.counts_E.sum()) == num_tokens * k
    if k <= 2:
        assert int((got.counts_E == 0).sum()) == num_experts - k  # empty experts


@requires_triton
def test_stablemoe_routing_is_sigmoid_top1():
    """StableMoE: argmax of the scores, gate = sigmoid of the chosen score, gradient on it only."""
    logits_TE = torch.randn(50, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    out = topk_gating(logits_TE, 1, "sigmoid")
    assert torch.equal(out.expert_ids_TK[:, 0], logits_TE.argmax(-1))
    best_T = logits_TE.max(-1).values
    torch.testing.assert_close(out.gates_TK[:, 0], torch.sigmoid(best_T))
    (grad_TE,) = torch.autograd.grad(out.gates_TK.sum(), logits_TE)
    expected_TE = torch.zeros_like(grad_TE)
    expected_TE.scatter_(1, out.expert_ids_TK, (torch.sigmoid(best_T) * torch.sigmoid(-best_T))[:, None])
    torch.testing.assert_close(grad_TE, expected_TE)


@requires_triton
def test_bias_moves_the_choice_not_the_gate():
    logits_TE = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    bias_E = torch.tensor([0.0, 0.0, 5.0, 0.0])
    out = topk_gating(logits_TE, 2, "sigmoid", False, bias_E)
    assert out.expert_ids_TK.tolist() == [[2, 0]]
    torch.testing.assert_close(out.gates_TK, torch.sigmoid(logits_TE[:, [2, 0]]))


@requires_triton
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_a_token_routes_the_same_whatever_the_batch_around_it(score_func):
    """Determinism that can break in the interpreter too: each token's choice and gates depend on its
    own scores alone (never on the other tokens, their order, or the program that handles them), bit
    for bit; the choices equal the reference's, on scores with many exact ties (a few distinct values)."""
    g = torch.Generator().manual_seed(4)
    logits_TE = torch.randint(0, 4, (203, 32), generator=g).float() / 4  # ties in almost every row
    perm = torch.randperm(203, generator=g)
    out = topk_gating(logits_TE, 4, score_func, True)
    ref = topk_gating_reference(logits_TE, 4, score_func, True)
    shuffled = topk_gating(logits_TE[perm], 4, score_func, True)
    alone = topk_gating(logits_TE[perm[:5]], 4, score_func, True)
    assert torch.equal(out.expert_ids_TK, ref.expert_ids_TK)
    torch.testing.assert_close(out.gates_TK, ref.gates_TK, atol=1e-6, rtol=1e-5)
    assert torch.equal(shuffled.expert_ids_TK, out.expert_ids_TK[perm])
    assert torch.equal(shuffled.gates_TK, out.gates_TK[perm]) and torch.equal(shuffled.counts_E, out.counts_E)
    assert torch.equal(alone.expert_ids_TK, out.expert_ids_TK[perm[:5]])
    assert torch.equal(alone.gates_TK, out.gates_TK[perm[:5]])


def test_gating_with_no_tokens():
    out = topk_gating(torch.zeros(0, 8), 2)
    assert out.expert_ids_TK.shape == (0, 2) and out.gates_TK.shape == (0, 2)
    assert out.counts_E.tolist() == [0] * 8


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (64, 6), (128, 8)])
def test_gating_native_gpu(num_experts, k, dtype):
    # NOTE: at 16K random fp32 rows some scores differ by an ulp, and the kernel's exp may round
    # them the other way than torch's; where the choice differs, both picks must be equal keys.
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits_TE = torch.randn(16384 + 7, num_experts, device="cuda", generator=gen).to(dtype)
    bias_E = torch.randn(num_experts, device="cuda", generator=gen) * 0.01
    for score_func, renorm, with_bias in VARIANTS:
        b_E = bias_E if with_bias else None
        got = topk_gating(logits_TE.requires_grad_(True), k, score_func, renorm, b_E)
        ref = topk_gating_reference(logits_TE, k, score_func, renorm, b_E)
        key_TE = ref.scores_TE.detach() + (b_E if b_E is not None else 0.0)
        same_T = (got.expert_ids_TK == ref.expert_ids_TK).all(-1)
        assert same_T.float().mean() > 0.999
        torch.testing.assert_close(key_TE.gather(1, got.expert_ids_TK), key_TE.gather(1, ref.expert_ids_TK))
        torch.testing.assert_close(got.counts_E.sum(), ref.counts_E.sum())
        torch.testing.assert_close(got.scores_TE, ref.scores_TE, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.gates_TK[same_T], ref.gates_TK[same_T], atol=1e-6, rtol=1e-5)
        w_TK = torch.randn_like(got.gates_TK)
        (g_got,) = torch.autograd.grad((got.gates_TK * w_TK).sum() + got.scores_TE.sum(), logits_TE)
        (g_ref,) = torch.autograd.grad((ref.gates_TK * w_TK).sum() + ref.scores_TE.sum(), logits_TE)
        torch.testing.assert_close(g_got[same_T], g_ref[same_T], **_tol(dtype))


@pytest.mark.parametrize(
    "experts,k", [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3), (8, 8)] + [(128, k) for k in (1, 2, 3, 8, 9)]
)
def test_topk_ids_is_a_stable_descending_sort_ties_included(experts, k):
    """The reference's selection (argmax passes for small k, a sort otherwise) equals the first k of a
    stable descending sort, also with many equal keys (lower id first) and with bias-shifted keys."""
    from moetrain.kernels.gating import topk_ids

    g = torch.Generator().manual_seed(experts * 10 + k)
    scores = torch.softmax(torch.randn(512, experts, generator=g), dim=-1)
    for key in (scores, (scores * 8).round() / 8, scores - 0.5 * torch.rand(experts, generator=g)):
        want = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(topk_ids(key, k), want)
