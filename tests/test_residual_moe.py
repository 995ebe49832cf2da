"""Residual MoE (DeepSpeed-MoE): a dense FFN beside the routed experts, mixed per token by a learned
softmax. EP equivalence: tests/test_expert_parallel.py (the residual-* case)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIG

from moetrain.config.model import MoEConfig
from moetrain.moe.layer import MoELayer


def test_the_output_mixes_the_moe_and_the_dense_branch_by_a_learned_softmax():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, expert_type="gelu", residual=True, kernels="torch")
    layer = MoELayer(cfg, d_model=8, d_hidden=16, vocab_size=10)
    plain = MoELayer(cfg.model_copy(update={"residual": False}), d_model=8, d_hidden=16, vocab_size=10)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("residual_")})
    x, ids = torch.randn(6, 8), torch.zeros(6, dtype=torch.long)
    coef = torch.softmax(x @ layer.residual_coef.weight.t() + layer.residual_coef.bias, dim=-1)
    dense = torch.nn.functional.gelu(x @ layer.residual_ffn.w_in_DF) @ layer.residual_ffn.w_out_FD
    expected = plain(x, ids).y_TD * coef[:, :1] + dense * coef[:, 1:]
    assert torch.allclose(layer(x, ids).y_TD, expected, atol=1e-6)
    assert layer.residual_ffn.w_out_FD.shape == (16, 8)  # the experts' width


def test_residual_with_stacked_experts_is_refused():
    with pytest.raises(ValueError, match="moe.residual's dense branch is a gelu or swiglu FFN"):
        MoEConfig(residual=True, expert_type="stacked")


def test_pyramid_layers_get_their_own_number_of_experts():
    from moetrain.config.model import ModelConfig
    from moetrain.model import MoETransformer

    moe = MoEConfig(num_experts_per_layer=[2, 6], placement="replace_ffn", expert_type="gelu", residual=True)
    model = MoETransformer(ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32), moe)
    assert [layer.num_experts for layer in model.moe_layers()] == [2, 6]
    assert [layer.router.weight_ED.shape[0] for layer in model.moe_layers()] == [2, 6]
    out = model(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8)))
    assert [len(s.load_E) for s in out.moe_stats] == [2, 6]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"num_experts_per_layer": [2, 3], "expert_parallel_size": 2}, r"holds 3; each must be a positive multiple"),
        ({"num_experts_per_layer": [2, 4], "router": {"kind": "hash"}}, "needs moe.router.kind topk or expert_choice"),
        ({"num_experts_per_layer": [1, 4], "router": {"kind": "topk", "top_k": 2}}, r"fewest experts of a layer \(1\)"),
    ],
)
def test_bad_pyramids_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)


def test_a_pyramid_must_name_every_moe_layer():
    from moetrain.config import load_config
    from moetrain.errors import UserError

    with pytest.raises(UserError, match=r"num_experts_per_layer has 3 entries but the model has 2 MoE layers"):
        load_config(
            TINY_CONFIG,
            ["moe.router.kind=topk", "moe.placement=replace_ffn", "moe.every=2", "moe.expert_type=gelu",
             "moe.num_experts_per_layer=[2, 4, 8]"],
        )  # fmt: skip
