"""Null experts (AdaMoE): the top-k router may choose zero-compute experts; their slots are not
dispatched, add nothing, are not counted as dropped, and lower the logged active experts per token.
EP equivalence: tests/test_expert_parallel.py (the null-* case)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, train_ok

from moetrain.config.model import MoEConfig
from moetrain.moe.layer import MoELayer

pytestmark = pytest.mark.timeout(300)


def layer_with_crafted_routing(capacity_factor=None) -> tuple[MoELayer, torch.Tensor]:
    """2 real experts (ids 0, 1) and 2 null ones (2, 3), top-2; the router is the identity on 4 dims, so
    token t picks the two largest coordinates of x_t."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=2,
        null_experts=2,
        expert_type="gelu",
        capacity_factor=capacity_factor,
        kernels="torch",
        router={"kind": "topk", "top_k": 2, "load_balance_coeff": 0.0},
    )
    layer = MoELayer(cfg, d_model=4, d_hidden=8, vocab_size=10)
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.eye(4))
    x = torch.tensor(
        [
            [5.0, 0.0, 4.0, 0.0],  # real 0 + null 2
            [0.0, 0.0, 5.0, 4.0],  # null 2 + null 3: no compute at all
            [4.0, 5.0, 0.0, 0.0],  # real 1 + real 0
        ]
    )
    return layer, x


def expert_out(layer: MoELayer, x_TD: torch.Tensor, e: int) -> torch.Tensor:
    counts = torch.zeros(layer.num_experts, dtype=torch.long)
    counts[e] = x_TD.shape[0]
    return layer.experts(x_TD, counts)


def test_null_slots_cost_nothing_and_add_nothing():
    layer, x = layer_with_crafted_routing()
    out = layer(x, torch.zeros(3, dtype=torch.long))
    decision = layer.router(x, torch.zeros(3, dtype=torch.long))
    assert decision.expert_ids_TK.tolist() == [[0, 2], [2, 3], [1, 0]]
    g = decision.gates_TK.detach()
    e0, e1 = expert_out(layer, x, 0), expert_out(layer, x, 1)
    expected = torch.stack([g[0, 0] * e0[0], torch.zeros(4), g[2, 0] * e1[2] + g[2, 1] * e0[2]])
    assert torch.allclose(out.y_TD, expected, atol=1e-6)
    x_ND, counts, meta = layer.dispatcher.dispatch(x, decision)
    assert counts.tolist() == [2, 1]  # 3 real slots computed, out of 6
    assert (meta.rows_TK[[0, 1, 1], [1, 0, 1]] == -1).all() and int(meta.dropped) == 0
    assert out.stats.aux_terms["active_experts"].item() == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert out.stats.load_E.tolist() == [2.0, 1.0, 2.0, 1.0]  # null experts' load: the last M entries


def test_null_slots_are_not_counted_as_dropped_in_capacity_mode():
    layer, x = layer_with_crafted_routing(capacity_factor=1.0)  # capacity ceil(1.0 * 6 / 2) = 3 per expert
    out = layer(x, torch.zeros(3, dtype=torch.long))
    assert int(out.stats.dropped) == 0


def test_bad_null_expert_configs_are_refused():
    with pytest.raises(ValueError, match=r"moe.null_experts \(2\) needs moe.router.kind: topk \(got stablemoe"):
        MoEConfig(null_experts=2, router={"kind": "stablemoe"})
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= moe.num_experts \(2\) \+ moe.null_experts \(2\)"):
        MoEConfig(num_experts=2, null_experts=2, router={"kind": "topk", "top_k": 5})


def test_null_experts_train_and_log_active_experts(tmp_path, data_cache):
    train_ok(
        tmp_path / "run",
        data_cache,
        "moe.router={kind: topk, top_k: 2}",
        "moe.null_experts=2",
        "moe.expert_type=gelu",
        "moe.placement=replace_ffn",
        "train.steps=10",
    )
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    active = [r["moe/layer0/active_experts"] for r in records]
    assert len(records) == 10 and all(0.0 <= a <= 2.0 for a in active) and min(active) < 2.0
    assert len(records[-1]["moe/layer0/load"]) == 4 + 2
