"""Hash router: a seeded fixed token-id -> expert table; routing is a pure function of the token id."""

import numpy as np
import torch

from moetrain.config.routers import HashRouterConfig
from moetrain.moe.routers.hash import HashRouter, balanced_table, random_table


def test_routing_is_a_pure_function_of_the_token_id():
    r = HashRouter(HashRouterConfig(seed=3), num_experts=4, vocab_size=50)
    ids = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(0))
    a = r(torch.randn(200, 8), ids)
    b = r(torch.randn(200, 8) * 100, ids)  # any hidden state, any position, any batch
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.expert_ids_TK[:, 0], r.table_V[ids])
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r(torch.randn(200, 8), ids[perm]).expert_ids_TK, a.expert_ids_TK[perm])
    r.eval()
    assert torch.equal(r(torch.randn(200, 8), ids).expert_ids_TK, a.expert_ids_TK)
    assert torch.equal(a.gates_TK, torch.ones(200, 1)) and not a.gates_TK.requires_grad
    assert a.aux_loss.item() == 0.0


def test_random_table_is_seeded_and_deals_the_vocabulary_evenly():
    t = random_table(1003, 8, seed=0)
    assert torch.equal(t, random_table(1003, 8, seed=0))
    assert not torch.equal(t, random_table(1003, 8, seed=1))
    counts = torch.bincount(t, minlength=8)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(HashRouter(HashRouterConfig(seed=5), 8, 1003).table_V, random_table(1003, 8, 5))


def test_balanced_table_fills_the_emptiest_expert_by_frequency():
    freq = np.array([10, 9, 1, 1, 1, 0, 0, 7])
    table = balanced_table(freq, 3).tolist()
    # ids by descending frequency: 0(10) 1(9) 7(7) 2(1) 3(1) 4(1) 5(0) 6(0); (load, ids owned) per expert:
    # 0->e0 (10,1); 1->e1 (9,1); 7->e2 (7,1); 2->e2 (8,2); 3->e2 (9,3); 4: e1 and e2 both at 9, e1 owns
    # fewer ids -> e1 (10,2); 5 and 6 (frequency 0) -> e2, the lightest (9).
    assert table == [0, 1, 2, 2, 1, 2, 2, 2]
    loads = np.bincount(table, weights=freq, minlength=3)
    assert loads.max() - loads.min() <= freq.max()


def test_table_is_saved_in_the_state_dict():
    r = HashRouter(HashRouterConfig(seed=0), 4, 20)
    r.set_table(torch.arange(20) % 4)
    fresh = HashRouter(HashRouterConfig(seed=9), 4, 20)
    fresh.load_state_dict(r.state_dict())
    assert torch.equal(fresh.table_V, torch.arange(20) % 4)
