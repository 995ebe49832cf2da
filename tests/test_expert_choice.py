"""Expert-choice routing: each expert takes its top-C tokens of each sequence; tokens chosen by several
experts are combined by their gates, tokens chosen by none add nothing. EP equivalence:
tests/test_expert_parallel.py (the expert-choice cases)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, run_cli, train_ok

from moetrain.config.model import MoEConfig
from moetrain.config.routers import ExpertChoiceRouterConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers.expert_choice import ExpertChoiceRouter

pytestmark = pytest.mark.timeout(300)

# 4 tokens, 2 experts; router = identity, so token t's logits are x_t
X = torch.tensor([[3.0, 0.0], [2.0, 1.0], [0.0, 0.5], [0.0, 2.0]])


def test_each_expert_takes_its_top_c_tokens():
    r = ExpertChoiceRouter(ExpertChoiceRouterConfig(top_k=1, capacity_factor=1.0), d_model=2, num_experts=2)
    with torch.no_grad():
        r.weight_ED.copy_(torch.eye(2))
    d = r(X, torch.zeros(4, dtype=torch.long))  # C = ceil(1.0 * 4 * 1 / 2) = 2
    scores = torch.softmax(X, dim=-1)  # expert 0 prefers tokens 0, 1; expert 1 tokens 3, 2
    assert d.expert_ids_TK.tolist() == [[0, 2], [0, 2], [1, 2], [1, 2]]
    assert torch.allclose(d.gates_TK[:, 0], scores[[0, 1, 2, 3], [0, 0, 1, 1]]) and (d.gates_TK[:, 1] == 0).all()
    assert d.aux_terms["experts_per_token"].item() == 1.0 and d.aux_terms["unrouted_frac"].item() == 0.0


def test_a_token_can_get_several_experts_or_none():
    r = ExpertChoiceRouter(ExpertChoiceRouterConfig(top_k=1, capacity_factor=1.0), d_model=2, num_experts=2)
    with torch.no_grad():
        r.weight_ED.copy_(torch.tensor([[1.0, 0.0], [1.0, -0.5]]))  # both experts like token 0 and 1 most
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    d = r(x, torch.zeros(4, dtype=torch.long))
    scores = torch.softmax(x @ r.weight_ED.detach().t(), dim=-1)
    # expert 0: top-2 of scores[:, 0]; expert 1: top-2 of scores[:, 1]
    pick0 = set(torch.sort(scores[:, 0], descending=True, stable=True).indices[:2].tolist())
    pick1 = set(torch.sort(scores[:, 1], descending=True, stable=True).indices[:2].tolist())
    for t in range(4):
        chosen = {e for e in (0, 1) if t in (pick0, pick1)[e]}
        got = {e for e in d.expert_ids_TK[t].tolist() if e < 2}
        assert got == chosen, (t, got, chosen)
    counts = torch.bincount(d.expert_ids_TK.reshape(-1), minlength=3)
    assert counts[:2].tolist() == [2, 2]  # exactly C each


def test_groups_are_sequences():
    """Two sequences of 4: each expert takes C = 2 tokens from each (4 in all), not 4 from the better one."""
    r = ExpertChoiceRouter(ExpertChoiceRouterConfig(top_k=1), d_model=2, num_experts=2)
    with torch.no_grad():
        r.weight_ED.copy_(torch.eye(2))
    x = torch.cat([X, X * 0.1])
    d = r(x, torch.zeros(8, dtype=torch.long), group_size=4)
    ids = d.expert_ids_TK
    for seq in (ids[:4], ids[4:]):
        assert torch.bincount(seq.reshape(-1), minlength=3)[:2].tolist() == [2, 2]
    whole = r(x, torch.zeros(8, dtype=torch.long))  # one group of 8: C = 4, the large-scale tokens win
    assert (whole.expert_ids_TK[:4, 0] < 2).all() and not (ids[4:, 0] == 2).all()


def test_the_layer_combines_the_chosen_experts_by_their_gates():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=2, expert_type="gelu", kernels="torch", router={"kind": "expert_choice", "top_k": 1})
    layer = MoELayer(cfg, d_model=2, d_hidden=4, vocab_size=10)
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.eye(2))
    out = layer(X, torch.zeros(4, dtype=torch.long))
    d = layer.router(X, torch.zeros(4, dtype=torch.long))
    expected = torch.zeros(4, 2)
    for e in (0, 1):
        counts = torch.zeros(2, dtype=torch.long)
        counts[e] = 4
        y = layer.experts(X, counts)
        for t in range(4):
            for k in range(2):
                if d.expert_ids_TK[t, k] == e:
                    expected[t] += d.gates_TK[t, k] * y[t]
    assert torch.allclose(out.y_TD, expected, atol=1e-6)
    assert out.stats.load_E.tolist() == [2.0, 2.0] and int(out.stats.dropped) == 0


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            {"num_experts": 2, "router": {"kind": "expert_choice", "top_k": 3}},
            r"top_k \(3\) must be <= moe.num_experts",
        ),
        ({"capacity_factor": 1.0, "router": {"kind": "expert_choice"}}, "does not apply to expert-choice routing"),
        ({"null_experts": 2, "router": {"kind": "expert_choice"}}, "needs moe.router.kind: topk"),
    ],
)
def test_bad_expert_choice_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)


def test_expert_choice_trains_evaluates_and_refuses_to_generate(tmp_path, data_cache):
    run = tmp_path / "run"
    train_ok(
        run,
        data_cache,
        "moe.router={kind: expert_choice, top_k: 2}",
        "moe.expert_type=gelu",
        "moe.placement=replace_ffn",
        "train.steps=12",
        "train.eval_interval=6",
    )
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and steps[-1]["moe/layer0/load_max_over_mean"] == pytest.approx(1.0)
    assert steps[-1]["moe/layer0/experts_per_token"] == pytest.approx(2.0)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0]
    proc = run_cli("generate", str(run), "--prompt", "def ", "--max-new-tokens", "5")
    assert proc.returncode == 2 and "expert-choice routing picks tokens from whole sequences" in proc.stderr
