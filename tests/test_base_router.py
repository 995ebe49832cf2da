"""BASE router: balanced assignment (exact optimum against brute force; the auction's guarantee),
greedy at evaluation, sigmoid gate with gradient, no aux loss."""

import itertools

import pytest
import torch

from moetrain.config.routers import BaseLayerRouterConfig
from moetrain.kernels import select_backend
from moetrain.moe.routers.balanced_assignment import auction_assignment, balanced_assignment, expert_capacities
from moetrain.moe.routers.base_layer import BaseLayerRouter


def brute_force(scores, caps):
    """Best total affinity over every assignment with exactly caps[i] tokens on expert i."""
    T, E = scores.shape
    best = -float("inf")
    for ids in itertools.product(range(E), repeat=T):
        if all(ids.count(i) == caps[i] for i in range(E)):
            best = max(best, sum(scores[t, ids[t]].item() for t in range(T)))
    return best


def affinity(scores, ids):
    return scores.double()[torch.arange(len(ids)), ids].sum().item()


def test_capacities():
    assert expert_capacities(8, 4) == [2, 2, 2, 2]
    assert expert_capacities(10, 4) == [3, 3, 2, 2]  # spare tokens go to the lowest expert ids
    assert expert_capacities(3, 4) == [1, 1, 1, 0]


@pytest.mark.parametrize("T,E", [(4, 2), (6, 2), (6, 3), (8, 4), (8, 2), (7, 3), (5, 4), (3, 4)])
def test_exact_assignment_is_balanced_and_optimal(T, E):
    gen = torch.Generator().manual_seed(T * 10 + E)
    for _ in range(10):
        scores = torch.randn(T, E, generator=gen)
        ids = balanced_assignment(scores, "exact")
        caps = expert_capacities(T, E)
        assert torch.bincount(ids, minlength=E).tolist() == caps  # exactly T/E each when divisible
        assert affinity(scores, ids) == pytest.approx(brute_force(scores.double(), caps), abs=1e-9)


def test_auction_is_balanced_and_epsilon_optimal():
    """fairseq's auction: within T * eps of the optimum (eps = range/50), and balanced."""
    gen = torch.Generator().manual_seed(0)
    for T, E in [(8, 4), (8, 2), (6, 3)]:
        scores = torch.randn(T, E, generator=gen)
        ids = balanced_assignment(scores, "auction")
        caps = expert_capacities(T, E)
        assert torch.bincount(ids, minlength=E).tolist() == caps
        eps = max((scores.max() - scores.min()).item() / 50, 1e-4)
        assert affinity(scores, ids) >= brute_force(scores.double(), caps) - T * eps - 1e-6


def test_large_batch_exact_beats_or_equals_the_auction_and_stays_balanced():
    scores = torch.randn(2048, 8, generator=torch.Generator().manual_seed(1)) * 3
    exact = balanced_assignment(scores, "exact")
    auction = auction_assignment(scores, expert_capacities(2048, 8))
    assert torch.bincount(exact, minlength=8).tolist() == [256] * 8
    assert torch.bincount(auction, minlength=8).tolist() == [256] * 8
    assert affinity(scores, exact) >= affinity(scores, auction) - 1e-6
    assert affinity(scores, exact) <= affinity(scores, scores.argmax(1))  # unbalanced greedy bounds it


def test_skewed_scores_are_still_balanced():
    scores = torch.zeros(12, 3)
    scores[:, 0] = 5.0  # every token prefers expert 0
    ids = balanced_assignment(scores, "exact")
    assert torch.bincount(ids, minlength=3).tolist() == [4, 4, 4]


def _router(**kw):
    torch.manual_seed(0)
    return BaseLayerRouter(BaseLayerRouterConfig(**kw), d_model=8, num_experts=4, backend=select_backend("torch"))


def test_router_training_is_balanced_eval_is_greedy_and_gate_is_sigmoid():
    r = _router()
    torch.manual_seed(1)
    x = torch.randn(32, 8, requires_grad=True)
    ids = torch.zeros(32, dtype=torch.long)
    d = r(x, ids)
    scores = x @ r.centroids_ED.t()
    assert torch.bincount(d.expert_ids_TK[:, 0], minlength=4).tolist() == [8, 8, 8, 8]
    assert torch.allclose(d.gates_TK, torch.sigmoid(scores.gather(1, d.expert_ids_TK)))
    assert d.aux_loss.item() == 0.0 and d.aux_terms == {}
    d.gates_TK.sum().backward()
    assert r.centroids_ED.grad.abs().sum() > 0  # the gate is the signal that trains E
    r.eval()
    with torch.no_grad():
        d = r(x, ids)
    assert torch.equal(d.expert_ids_TK[:, 0], scores.argmax(1))


def test_orthogonal_init():
    r = _router()
    assert torch.allclose(r.centroids_ED @ r.centroids_ED.t(), 0.01 * torch.eye(4), atol=1e-6)
