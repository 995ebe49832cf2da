"""StableMoE router: balance loss, distillation, the two stages, evaluation routing, the DP reduction.

Worked example used below (d = 2, E = 2, centroids E = identity, so s_t = x_t):

    t0 x=[2, 0]   s=[2, 0]    -> expert 0
    t1 x=[1, 0]   s=[1, 0]    -> expert 0
    t2 x=[.5, 0]  s=[.5, 0]   -> expert 0
    t3 x=[0, 1]   s=[0, 1]    -> expert 1
    |A| = [3, 1], n̄ = T/E = 2, count factor c = (|A| - n̄)/n̄ = [+0.5, -0.5]
    L_bal (per token) = (1/T) * sum_i c_i * sum_{t in A_i} sigmoid(s_ti)
                      = (1/4) * (0.5*(σ(2)+σ(1)+σ(.5)) - 0.5*σ(1)) = (σ(2)+σ(.5)) / 8
    aux_loss = 0.3 * L_bal (distill_coeff 0 here)
    d aux / d x_t = 0.3/4 * c_{a_t} * σ'(s_t,a_t) * E_{a_t}: positive along E_0 for the over-loaded
    expert's tokens (descent lowers their scores), negative for the under-loaded expert's token.
"""

import math

import pytest
import torch
from distributed import run_distributed

from moetrain.config.routers import StableMoERouterConfig
from moetrain.kernels import select_backend
from moetrain.moe.routers.stablemoe import RouterStage, StableMoERouter

X = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
IDS = torch.tensor([0, 1, 2, 3])


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def make_router(d=2, num_experts=2, vocab=4, identity=True, stats_group=None, **kw) -> StableMoERouter:
    torch.manual_seed(0)
    r = StableMoERouter(StableMoERouterConfig(**kw), d, num_experts, vocab, select_backend("torch"), stats_group)
    if identity:
        with torch.no_grad():
            r.centroids_ED.copy_(torch.eye(num_experts, d))
    return r


def test_balance_loss_value_and_gradient_sign_hand_computed():
    r = make_router(distill_coeff=0.0)
    x = X.clone().requires_grad_(True)
    d = r(x, IDS)
    assert d.expert_ids_TK[:, 0].tolist() == [0, 0, 0, 1]
    assert d.gates_TK[:, 0].tolist() == pytest.approx([sig(2), sig(1), sig(0.5), sig(1)])
    expected = (sig(2) + sig(0.5)) / 8
    assert d.aux_terms["load_balance"].item() == pytest.approx(expected, rel=1e-6)
    assert d.aux_loss.item() == pytest.approx(0.3 * expected, rel=1e-6)
    d.aux_loss.backward()
    # the count factor is a constant: the gradient is exactly 0.3/T * c * σ'(s) * E_a
    coef = torch.tensor([0.5, 0.5, 0.5, -0.5])
    s = torch.tensor([2.0, 1.0, 0.5, 1.0])
    dsig = torch.sigmoid(s) * (1 - torch.sigmoid(s))
    expected_grad = (0.3 / 4 * coef * dsig)[:, None] * torch.eye(2)[[0, 0, 0, 1]]
    assert torch.allclose(x.grad, expected_grad, atol=1e-7)
    assert (x.grad[:3, 0] > 0).all() and x.grad[3, 1] < 0  # over-loaded pushed down, under-loaded up
    g = r.centroids_ED.grad
    assert (g[0] @ X[:3].t() > 0).all() and (g[1] @ X[3] < 0)  # same through the centroids


def test_balanced_routing_has_zero_balance_loss():
    r = make_router(distill_coeff=0.0)
    d = r(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert d.aux_loss.item() == 0.0


def test_distillation_trains_only_the_distilled_router():
    def grads(distill_coeff):
        r = make_router(d=8, num_experts=4, vocab=16, identity=False, distill_coeff=distill_coeff)
        torch.manual_seed(1)
        x = torch.randn(32, 8, requires_grad=True)
        ids = torch.randint(0, 16, (32,))
        d = r(x, ids)
        task = (d.gates_TK[:, 0] * torch.linspace(-1, 1, 32)).sum()  # stands in for the task loss
        (task + d.aux_loss).backward()
        return r, x.grad

    r0, gx0 = grads(0.0)
    r1, gx1 = grads(0.3)
    assert torch.equal(gx0, gx1) and torch.equal(r0.centroids_ED.grad, r1.centroids_ED.grad)  # backbone unchanged
    assert r1.distill_embed_VR.grad.abs().sum() > 0 and r1.distill_centroids_ER.grad.abs().sum() > 0
    assert r0.distill_embed_VR.grad.abs().sum() == 0 and r0.distill_centroids_ER.grad.abs().sum() == 0


def test_distilled_router_learns_the_backbone_assignment():
    """Its target is the detached backbone argmax; minimising L_dis alone makes it agree."""
    r = make_router(d=8, num_experts=4, vocab=16, identity=False, balance_coeff=0.0, distill_coeff=1.0)
    torch.manual_seed(2)
    x = torch.randn(16, 8)
    ids = torch.arange(16)  # one context per token id, so a token-id router can be exact
    opt = torch.optim.Adam(r.distilled_parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        r(x, ids).aux_loss.backward()
        opt.step()
    assert r(x, ids).aux_terms["distill_acc"].item() == 1.0


def test_stage2_routes_by_the_frozen_distilled_router_and_still_trains_the_centroids():
    r = make_router(d=8, num_experts=4, vocab=16, identity=False)
    r.set_stage(RouterStage.FROZEN)
    assert r.stage is RouterStage.FROZEN and int(r.stage_buf) == 1
    assert not any(p.requires_grad for p in r.distilled_parameters())
    torch.manual_seed(3)
    x = torch.randn(32, 8, requires_grad=True)
    ids = torch.randint(0, 16, (32,))
    d = r(x, ids)
    expected_ids = (r.distill_embed_VR[ids] @ r.distill_centroids_ER.t()).argmax(-1)
    assert torch.equal(d.expert_ids_TK[:, 0], expected_ids)
    scores = x @ r.centroids_ED.t()
    assert torch.allclose(d.gates_TK[:, 0], torch.sigmoid(scores.gather(1, expected_ids[:, None]))[:, 0])
    assert d.aux_loss.item() == 0.0 and not d.aux_loss.requires_grad
    d.gates_TK.sum().backward()
    assert r.centroids_ED.grad.abs().sum() > 0  # E keeps learning through the gate
    assert all(p.grad is None for p in r.distilled_parameters())
    # the assignment depends on the token id only: any other hidden states route the same way
    assert torch.equal(r(torch.randn(32, 8), ids).expert_ids_TK, d.expert_ids_TK)


@pytest.mark.parametrize("eval_routing", ["distilled", "backbone"])
def test_evaluation_routing_option(eval_routing):
    r = make_router(d=8, num_experts=4, vocab=16, identity=False, eval_routing=eval_routing).eval()
    torch.manual_seed(4)
    x, ids = torch.randn(64, 8), torch.randint(0, 16, (64,))
    d = r(x, ids)
    distilled = r.distilled_logits(ids).argmax(-1)
    backbone = (x @ r.centroids_ED.t()).argmax(-1)
    assert torch.equal(d.expert_ids_TK[:, 0], distilled if eval_routing == "distilled" else backbone)
    assert d.aux_loss.item() == 0.0 and d.aux_terms == {}
    r.set_stage(RouterStage.FROZEN)  # stage 2 evaluates with the frozen router whatever the option
    assert torch.equal(r(x, ids).expert_ids_TK[:, 0], distilled)


def test_stage_is_saved_in_the_state_dict():
    r = make_router()
    r.set_stage(RouterStage.FROZEN)
    fresh = make_router()
    assert fresh.stage is RouterStage.LEARN
    fresh.load_state_dict(r.state_dict())
    assert fresh.stage is RouterStage.FROZEN and not fresh.distill_embed_VR.requires_grad


def test_stage1_steps_default_is_ten_percent():
    assert StableMoERouterConfig().resolved_stage1_steps(60000) == 6000
    assert StableMoERouterConfig().resolved_stage1_steps(8) == 1
    assert StableMoERouterConfig(stage1_steps=7).resolved_stage1_steps(8) == 7


def test_initialisation_as_the_code():
    r = make_router(d=16, num_experts=4, vocab=10, identity=False)
    gram = r.centroids_ED @ r.centroids_ED.t()
    assert torch.allclose(gram, 0.01 * torch.eye(4), atol=1e-6)  # orthogonal rows, gain 0.1
    assert torch.allclose(r.distill_centroids_ER @ r.distill_centroids_ER.t(), 0.01 * torch.eye(4), atol=1e-6)
    assert r.distill_embed_VR.shape == (10, 50)


# --- data parallelism: per-rank losses averaged == one process over the global micro-batch ----------

SPLIT = [5, 11]  # tokens per rank: uneven on purpose


def _global_batch():
    torch.manual_seed(5)
    return torch.randn(sum(SPLIT), 8), torch.randint(0, 16, (sum(SPLIT),))


def _reference():
    r = make_router(d=8, num_experts=4, vocab=16, identity=False)
    x, ids = _global_batch()
    d = r(x, ids)
    d.aux_loss.backward()
    return d.aux_loss.item(), r.centroids_ED.grad.clone(), r.distill_centroids_ER.grad.clone()


def _ranks(rank, world, expected):
    import torch.distributed as dist

    r = make_router(d=8, num_experts=4, vocab=16, identity=False, stats_group=dist.group.WORLD)
    x, ids = _global_batch()
    lo = sum(SPLIT[:rank])
    d = r(x[lo : lo + SPLIT[rank]], ids[lo : lo + SPLIT[rank]])
    d.aux_loss.backward()
    stats = torch.cat(
        [d.aux_loss.detach().reshape(1), r.centroids_ED.grad.reshape(-1), r.distill_centroids_ER.grad.reshape(-1)]
    )
    dist.all_reduce(stats)
    stats /= world  # what gradient averaging does
    loss, g_e, g_d = expected
    assert stats[0].item() == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(stats[1 : 1 + g_e.numel()], g_e.reshape(-1), atol=1e-7)
    assert torch.allclose(stats[1 + g_e.numel() :], g_d.reshape(-1), atol=1e-7)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_data_parallel_reduction_equals_one_process():
    run_distributed(_ranks, 2, _reference())


@pytest.mark.parametrize("router", [{"kind": "stablemoe"}, {"kind": "hash"}], ids=["stablemoe", "hash"])
def test_moe_layer_with_the_router_makes_no_host_sync_in_either_stage(router):
    """The stage is read from a host mirror, never from the device buffer (BASE's balanced assignment,
    by contrast, runs on the host by design)."""
    from host_sync import HostSyncCounter

    from moetrain.config.model import MoEConfig
    from moetrain.moe.layer import MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, kernels="torch", expert_type="stacked", sublayers=2, router=router)
    layer = MoELayer(cfg, d_model=64, d_hidden=128, vocab_size=256)

    def step():
        x = torch.randn(48, 64, requires_grad=True)
        out = layer(x, torch.randint(0, 256, (48,)))
        (out.y_TD.square().mean() + out.aux_loss).backward()

    for stage in (RouterStage.LEARN, RouterStage.FROZEN):
        if isinstance(layer.router, StableMoERouter):
            layer.router.set_stage(stage)
        step()  # warm-up outside the counter
        with HostSyncCounter() as syncs:
            step()
        assert syncs.count == 0, syncs.report()
