"""DeepSeek-V3 routing on the top-k router vs transformers' ``DeepseekV3TopkRouter`` and ``DeepseekV3MoE``:
sigmoid scores, the e_score_correction_bias (selection only), group-limited top-k, renormalised gates,
the routed scaling factor; the Triton and torch backends equal (TRITON_INTERPRET=1 on CPU); the imported
bias survives a bf16 cast bit for bit and still moves by +-rate; training with all of it (MLA, yarn)
through the CLI, resumed mid-way, gives the uninterrupted run's losses. EP: tests/test_expert_parallel.py
(the deepseek-* case)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, train_ok
from safetensors.torch import load_file

from moetrain.config.model import MoEConfig
from moetrain.config.routers import TopKRouterConfig
from moetrain.kernels import select_backend
from moetrain.kernels.gating import topk_gating, topk_gating_reference
from moetrain.kernels.runtime import triton_available
from moetrain.moe.routers.topk import TopKRouter

transformers = pytest.importorskip("transformers")
from hf_import import dict_reader, moetrain_model, randomize  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402

from moetrain.hf.families import deepseek_v3  # noqa: E402

pytestmark = pytest.mark.timeout(300)
requires_triton = pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")

E, D = 16, 24


def hf_moe_config(norm: bool, scale: float, n_group: int = 4, topk_group: int = 2, k: int = 4) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=D,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=E,
        n_shared_experts=2,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=k,
        first_k_dense_replace=0,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
    )


def router_pair(norm: bool, scale: float, backend: str = "torch", **kw):
    config = hf_moe_config(norm, scale, **kw)
    hf = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=g))
        hf.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)  # large enough to change choices
    router_cfg = TopKRouterConfig(**{**deepseek_v3.to_moetrain(config.to_dict())["moe"]["router"], "kind": "topk"})
    ours = TopKRouter(router_cfg, D, E, select_backend(backend))
    with torch.no_grad():
        ours.weight_ED.copy_(hf.weight)
        ours.bias_base_E.copy_(hf.e_score_correction_bias.view(torch.int32))
    return hf, ours.eval()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("scale,n_group,topk_group,k", [(2.5, 4, 2, 4), (1.0, 8, 3, 2), (0.7, 1, 1, 3)])
def test_router_equals_deepseek_v3_topk_router(norm, scale, n_group, topk_group, k):
    hf, ours = router_pair(norm, scale, n_group=n_group, topk_group=topk_group, k=k)
    x_TD = torch.randn(300, D, generator=torch.Generator().manual_seed(1))
    _, weights_hf, ids_hf = hf(x_TD)
    d = ours(x_TD, torch.zeros(300, dtype=torch.long))
    # transformers' top-k is unsorted: compare each token's experts as a set, and the gate of each
    order_hf, order = ids_hf.argsort(dim=-1), d.expert_ids_TK.argsort(dim=-1)
    assert torch.equal(ids_hf.gather(1, order_hf), d.expert_ids_TK.gather(1, order))
    torch.testing.assert_close(d.gates_TK.gather(1, order), weights_hf.gather(1, order_hf), atol=1e-6, rtol=1e-6)
    # the bias and the group limit did decide something: plain top-k of the scores differs
    plain = torch.sigmoid(x_TD @ hf.weight.t()).topk(k, dim=-1).indices.sort(dim=-1).values
    assert not torch.equal(plain, d.expert_ids_TK.sort(dim=-1).values)


def test_group_limit_keeps_only_the_best_groups():
    """4 groups of 2; group scores (top-2 sums) 0.3, 1.7, 0.8, 1.1 -> groups 1 and 3 for topk_groups 2, so
    expert 4 (the best single score, in group 2) is out."""
    key = torch.tensor([[0.1, 0.2, 0.8, 0.9, 0.95, -0.15, 0.5, 0.6]])
    logits = torch.logit(key.clamp(1e-3, 1 - 1e-3))
    out = topk_gating_reference(torch.logit(torch.full((1, 8), 0.5)), 2, "sigmoid", False, key[0] - 0.5, 4, 2)
    assert out.expert_ids_TK.tolist() == [[3, 2]]
    assert topk_gating_reference(logits, 2, "sigmoid", False, None, 4, 4).expert_ids_TK.tolist() == [[4, 3]]


def test_moe_block_equals_deepseek_v3_moe():
    """Routed experts, shared experts, group limit, bias, scaling: the whole MoE block, weights by the rules."""
    config = hf_moe_config(True, 2.5)
    hf = DeepseekV3ForCausalLM(config).eval()
    randomize(hf)
    hc, sd = config.to_dict(), hf.state_dict()
    model = moetrain_model(deepseek_v3.to_moetrain(hc), deepseek_v3.rules(hc, set(sd)), dict_reader(sd))
    x_BSD = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.model.layers[0].mlp(x_BSD)
        got = model.layers[0].ffn(x_BSD.reshape(-1, D), torch.zeros(33, dtype=torch.long), 11).y_TD
    torch.testing.assert_close(got.view_as(want), want, atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("num_tokens,groups,topk_groups,k", [(37, 4, 2, 4), (130, 8, 1, 2), (5, 2, 1, 1)])
def test_triton_gating_with_groups_equals_the_reference(num_tokens, groups, topk_groups, k, renorm):
    g = torch.Generator().manual_seed(num_tokens + k)
    logits = torch.randn(num_tokens, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.2
    w_gates = torch.randn(num_tokens, k, generator=g)
    outs, grads = [], []
    for fn in (topk_gating, topk_gating_reference):
        x = logits.clone().requires_grad_(True)
        out = fn(x, k, "sigmoid", renorm, bias, groups, topk_groups)
        ((out.gates_TK * w_gates).sum() + out.scores_TE.sum()).backward()
        outs.append(out)
        grads.append(x.grad)
    assert torch.equal(outs[0].expert_ids_TK, outs[1].expert_ids_TK)
    assert torch.equal(outs[0].counts_E, outs[1].counts_E)
    torch.testing.assert_close(outs[0].gates_TK, outs[1].gates_TK, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


@requires_triton
def test_triton_router_equals_deepseek_v3():
    hf, ours = router_pair(True, 2.5, backend="triton")
    x_TD = torch.randn(64, D, generator=torch.Generator().manual_seed(3))
    _, weights_hf, ids_hf = hf(x_TD)
    d = ours(x_TD, torch.zeros(64, dtype=torch.long))
    assert torch.equal(ids_hf.sort(dim=-1).values, d.expert_ids_TK.sort(dim=-1).values)
    torch.testing.assert_close(d.gates_TK.sum(-1), weights_hf.sum(-1), atol=1e-6, rtol=1e-6)


def test_renormalisation_divides_by_the_sum_plus_epsilon():
    """transformers' (and DeepSeek's) form: g / (sum g + 1e-20), not a clamp; an all-zero sum stays 0."""
    logits = torch.tensor([[-200.0, -200.0, -300.0]])  # sigmoid underflows to 0 in fp32
    out = topk_gating_reference(logits, 2, "sigmoid", True)
    assert torch.equal(out.gates_TK, torch.zeros(1, 2))


def test_the_imported_bias_survives_bf16_and_moves_by_the_rate():
    cfg = TopKRouterConfig(top_k=1, score_func="sigmoid", correction_bias=True, bias_update_rate=0.001)
    r = TopKRouter(cfg, 4, 3, select_backend("torch"))
    imported = torch.tensor([0.123456789, -1.0000001, 3.3e-5])
    r.bias_base_E.copy_(imported.view(torch.int32))
    r = r.to(torch.bfloat16)
    assert r.bias_base_E.dtype == torch.int32 and torch.equal(r.bias_E, imported)  # bit for bit
    r.pending_load_E.copy_(torch.tensor([0, 3, 3]))
    r.update_bias()
    assert torch.equal(r.bias_E, imported + 0.001 * torch.tensor([1.0, -1.0, -1.0]))
    before = r.bias_E.clone()
    r.fold_bias_steps()  # export writes one fp32 vector: the same bias, steps 0
    assert torch.equal(r.bias_E, before) and r.bias_steps_E.abs().sum() == 0


def test_without_a_rate_the_imported_bias_stays_put():
    r = TopKRouter(TopKRouterConfig(correction_bias=True), 4, 3, select_backend("torch"))
    assert not r.balances_by_bias and not hasattr(r, "bias_steps_E")
    r.bias_base_E.copy_(torch.tensor([0.5, 0.0, -0.5]).view(torch.int32))
    r.train()(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert torch.equal(r.bias_E, torch.tensor([0.5, 0.0, -0.5]))


def test_group_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="topk_groups \\(3\\) must be <= moe.router.num_groups \\(2\\)"):
        TopKRouterConfig(num_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="num_groups \\(3\\) must divide the experts of a layer \\(8\\)"):
        MoEConfig(num_experts=8, router={"kind": "topk", "num_groups": 3})
    with pytest.raises(ValueError, match="top_k \\(5\\) must be <= the experts of the topk_groups"):
        MoEConfig(num_experts=8, router={"kind": "topk", "num_groups": 4, "topk_groups": 2, "top_k": 5})
    with pytest.raises(ValueError, match="does not combine with moe.null_experts"):
        MoEConfig(num_experts=8, null_experts=2, router={"kind": "topk", "num_groups": 2})


# A moetrain-native DeepSeek-V3-style model: MLA with yarn, a dense first block, shared experts, sigmoid
# routing limited to 1 of 2 groups, correction bias moved by the aux-loss-free rate.
DEEPSEEK_STYLE = [
    "model.arch=llama",
    "model.attention=mla",
    "model.mla={q_lora_rank: 16, kv_lora_rank: 12, qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 8}",
    "model.rope_scaling={kind: yarn, factor: 4, original_max_position_embeddings: 16, mscale: 1, mscale_all_dim: 1}",
    "moe.placement=replace_ffn",
    "moe.expert_type=swiglu",
    "moe.layers=[1]",
    "moe.shared_experts=1",
    "moe.router={kind: topk, top_k: 2, score_func: sigmoid, renormalize: true, num_groups: 2, topk_groups: 1, "
    "gate_scale: 2.5, correction_bias: true, bias_update_rate: 0.001, load_balance_coeff: 0}",
]


def test_training_deepseek_style_resumes_exactly(tmp_path, data_cache):
    args = [*DEEPSEEK_STYLE, "train.steps=6"]
    train_ok(tmp_path / "full", data_cache, *args)
    train_ok(tmp_path / "split", data_cache, *args, "train.stop_at_step=3")
    assert "resumed from" in train_ok(tmp_path / "split", data_cache, *args).stdout
    loss = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert len(loss(tmp_path / "full")) == 6 and loss(tmp_path / "split") == loss(tmp_path / "full")
    assert loss(tmp_path / "full")[-1] < loss(tmp_path / "full")[0]

    def biases(run, step=6):
        saved = load_file(str(run / "checkpoints" / f"step_{step:06d}" / "shared.safetensors"))
        return {k: v for k, v in saved.items() if "bias_" in k}

    full, split = biases(tmp_path / "full"), biases(tmp_path / "split")
    assert {k.rsplit(".", 1)[-1] for k in full} == {"bias_steps_E", "bias_base_E"}
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    moved = [biases(tmp_path / "split", 3), full]  # the steps saved mid-way and at the end
    assert all(any(v.abs().sum() > 0 for k, v in b.items() if k.endswith("bias_steps_E")) for b in moved)
