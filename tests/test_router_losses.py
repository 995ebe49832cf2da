"""Top-k router and aux losses against hand-computed values."""

import math

import pytest
import torch

from moetrain.config.routers import TopKRouterConfig
from moetrain.kernels import select_backend
from moetrain.moe import aux
from moetrain.moe.routers.topk import TopKRouter


def test_switch_load_balance_loss_hand_computed():
    # 4 tokens, 2 experts, k=1. probs rows: [.9,.1] [.8,.2] [.3,.7] [.6,.4]; argmax -> 0,0,1,0.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    counts = torch.tensor([3, 1])
    # f = [3/4, 1/4]; P = mean probs = [2.6/4, 1.4/4] = [.65, .35]; E * sum f*P = 2 * (.4875 + .0875) = 1.15
    loss = aux.switch_load_balance_loss(probs, counts, top_k=1)
    assert loss.item() == pytest.approx(1.15, abs=1e-6)


def test_load_balance_is_one_when_balanced_and_pushes_overloaded_expert_down():
    probs = torch.full((4, 4), 0.25, requires_grad=True)
    loss = aux.switch_load_balance_loss(probs, torch.tensor([1, 1, 1, 1]), top_k=1)
    assert loss.item() == pytest.approx(1.0)
    probs2 = torch.tensor([[0.7, 0.3], [0.6, 0.4]], requires_grad=True)
    aux.switch_load_balance_loss(probs2, torch.tensor([2, 0]), top_k=1).backward()
    assert (probs2.grad[:, 0] > 0).all() and (probs2.grad[:, 1] == 0).all()  # descent lowers expert 0


def test_top2_counts_slots():
    # k=2 with 2 experts: every token uses both -> f = [.5, .5] whatever the probabilities.
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    loss = aux.switch_load_balance_loss(probs, torch.tensor([2, 2]), top_k=2)
    assert loss.item() == pytest.approx(2 * (0.5 * 0.55 + 0.5 * 0.45))


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp rows: log 2, log 4 -> mean of squares
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert aux.z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def _router(**kw):
    cfg = TopKRouterConfig(**kw)
    r = TopKRouter(cfg, d_model=2, num_experts=3, backend=select_backend("torch"))
    with torch.no_grad():
        r.weight_ED.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    return r


def test_topk_router_decision_and_aux_terms():
    r = _router(top_k=2, load_balance_coeff=0.5, z_loss_coeff=0.1)
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    d = r(x, torch.tensor([0, 1]))
    # logits: t0 [2,0,2] -> tie between experts 0 and 2: lower id first; t1 [0,3,3] -> 1 then 2.
    assert d.expert_ids_TK.tolist() == [[0, 2], [1, 2]]
    p0 = torch.softmax(torch.tensor([2.0, 0.0, 2.0]), 0)
    assert d.gates_TK[0].tolist() == pytest.approx([p0[0].item(), p0[2].item()])
    assert d.aux_loss.item() == pytest.approx(
        0.5 * d.aux_terms["load_balance"].item() + 0.1 * d.aux_terms["z_loss"].item()
    )
    r.eval()
    assert r(x, torch.tensor([0, 1])).aux_loss.item() == 0.0  # aux losses are training-only


def test_sigmoid_renormalised_gates_sum_to_one():
    r = _router(top_k=2, score_func="sigmoid", renormalize=True)
    d = r(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
    assert torch.allclose(d.gates_TK.sum(-1), torch.ones(5))
