"""Every router of the paper's comparison trains end to end in both placements: the paper's inserted
MoE layer with stacked-sublayer experts, and the modern FFN replacement (two MoE layers here)."""

import math

import pytest
from conftest import TINY, TINY_CONFIG, read_metrics, run_cli

pytestmark = pytest.mark.timeout(300)

ROUTERS = {
    "stablemoe": "{kind: stablemoe}",
    "base_exact": "{kind: base, assignment: exact}",
    "base_auction": "{kind: base, assignment: auction}",
    "hash_random": "{kind: hash}",
    "hash_balanced": "{kind: hash, table: balanced}",
    "switch": "{kind: topk, top_k: 1, load_balance_coeff: 0.3, init: orthogonal}",
}
PLACEMENTS = {
    "insert": [],
    "replace_ffn": ["moe.placement=replace_ffn", "moe.every=1", "moe.expert_type=gelu"],
}
CASES = [
    ("stablemoe", "insert"),
    ("stablemoe", "replace_ffn"),
    ("base_auction", "insert"),
    ("base_exact", "replace_ffn"),
    ("hash_random", "insert"),
    ("hash_balanced", "replace_ffn"),
    ("switch", "insert"),
    ("switch", "replace_ffn"),
]
AUX_TERMS = {"stablemoe": {"load_balance", "distill", "distill_acc"}, "switch": {"load_balance"}}


@pytest.mark.parametrize("router,placement", CASES, ids=[f"{r}-{p}" for r, p in CASES])
def test_router_trains_in_placement(tmp_path, data_cache, router, placement):
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        str(TINY_CONFIG),
        *TINY,
        f"data.cache_dir={data_cache}",
        f"run_dir={run}",
        "train.steps=3",
        f"moe.router={ROUTERS[router]}",
        *PLACEMENTS[placement],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs)
    layers = 2 if placement == "replace_ffn" else 1
    for i in range(layers):
        terms = {k.split("/")[-1] for k in recs[0] if k.startswith(f"moe/layer{i}/")}
        assert AUX_TERMS.get(router.split("_")[0], set()) <= terms
        if router.startswith("base"):  # 4 x 32 tokens over 4 experts: exactly 32 each in training
            assert all(r[f"moe/layer{i}/load_min"] == r[f"moe/layer{i}/load_max"] == 32 for r in recs)
    assert f"moe/layer{layers}/load_min" not in recs[0]
    assert (run / "config.yaml").read_text().count(f"kind: {router.split('_')[0].replace('switch', 'topk')}") == 1


def test_same_seed_gives_the_same_backbone_and_experts_for_every_router():
    """Routers draw once from the global RNG (routers/init.py): only the router's weights differ."""
    import torch

    from moetrain.config.model import ModelConfig, MoEConfig
    from moetrain.config.routers import BaseLayerRouterConfig, HashRouterConfig, StableMoERouterConfig, TopKRouterConfig
    from moetrain.model import MoETransformer

    model_cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    weights = []
    for router in (
        StableMoERouterConfig(),
        BaseLayerRouterConfig(),
        HashRouterConfig(),
        TopKRouterConfig(init="orthogonal"),
    ):
        torch.manual_seed(0)
        moe = MoEConfig(placement="insert", expert_type="stacked", num_experts=4, sublayers=2, router=router)
        sd = MoETransformer(model_cfg, moe).state_dict()
        weights.append({k: v for k, v in sd.items() if ".router." not in k})
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in other)


def test_stacked_experts_in_capacity_mode_match_the_loop_reference():
    """With a capacity (the paper configs' capacity_factor 2.0) the permuted buffer has rows of no
    expert; the grouped-GEMM path must give them zero output and pass them no gradient, as the loop
    does, or garbage reaches the per-row LayerNorm and bias parameters of the stacked experts."""
    import torch

    from moetrain.moe.experts import GroupedExperts

    torch.manual_seed(0)
    fast = GroupedExperts("stacked", 4, 16, 32, sublayers=2)
    with torch.no_grad():
        fast.w2_SLFD.normal_(std=0.1)  # non-zero so that every parameter gets a gradient
    ref = GroupedExperts("stacked", 4, 16, 32, sublayers=2).double()  # float64: the loop path
    ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = torch.randn(12, 16)
    counts = torch.tensor([3, 2, 0, 4])  # 9 rows routed, 3 rows of no expert
    out = {}
    for name, experts, xin in (("fast", fast, x.clone()), ("ref", ref, x.double())):
        xin.requires_grad_(True)
        y = experts(xin, counts, padded=True)  # rows past counts.sum() belong to no expert
        (y[:9] * torch.linspace(-1, 1, 16, dtype=y.dtype)).sum().backward()
        out[name] = (
            y[:9].detach().double(),
            {k: p.grad.double() for k, p in experts.named_parameters()},
            xin.grad.double(),
        )
    assert torch.allclose(out["fast"][0], out["ref"][0], atol=1e-5)
    for k, g in out["ref"][1].items():
        assert torch.isfinite(out["fast"][1][k]).all() and torch.allclose(out["fast"][1][k], g, atol=1e-4), k
    assert torch.allclose(out["fast"][2][:9], out["ref"][2][:9], atol=1e-5)
