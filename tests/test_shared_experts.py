"""Shared experts (DeepSeekMoE): computed densely beside the routed experts and added to their output.
EP equivalence: tests/test_expert_parallel.py (the shared-* case)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, train_ok

from moetrain.config.model import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.shared import SharedExperts

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_n_shared_experts_are_n_ffns_whose_outputs_add(kind):
    """Width 2*h is the sum of two FFNs of width h (each owns half the hidden units)."""
    torch.manual_seed(0)
    D, h, T = 6, 4, 5
    shared = SharedExperts(kind, D, 2 * h)
    x = torch.randn(T, D)

    def ffn(w_in, w_out):
        z = x @ w_in
        if kind == "swiglu":
            a, b = z.chunk(2, dim=-1)
            return (F.silu(a) * b) @ w_out
        return F.gelu(z) @ w_out

    w_in, w_out = shared.w_in_DF.detach(), shared.w_out_FD.detach()
    if kind == "swiglu":  # [gate | up] halves, each split per expert
        gate, up = w_in.chunk(2, dim=-1)
        parts = [torch.cat([gate[:, i * h : (i + 1) * h], up[:, i * h : (i + 1) * h]], dim=-1) for i in range(2)]
    else:
        parts = [w_in[:, i * h : (i + 1) * h] for i in range(2)]
    expected = sum(ffn(parts[i], w_out[i * h : (i + 1) * h]) for i in range(2))
    assert torch.allclose(shared(x), expected, atol=1e-6)


def test_the_layer_adds_the_shared_output_to_the_routed_one():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, expert_type="swiglu", shared_experts=2, shared_expert_hidden=3, kernels="torch")
    layer = MoELayer(cfg, d_model=8, d_hidden=16, vocab_size=50)
    plain = MoELayer(cfg.model_copy(update={"shared_experts": 0}), d_model=8, d_hidden=16, vocab_size=50)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    assert layer.shared.w_out_FD.shape == (6, 8)  # 2 experts x width 3
    x, ids = torch.randn(10, 8), torch.zeros(10, dtype=torch.long)
    out, ref = layer(x, ids), plain(x, ids)
    assert torch.allclose(out.y_TD, ref.y_TD + layer.shared(x), atol=1e-6)
    assert not any(".experts." in f".{n}." for n, _ in layer.shared.named_parameters())  # never sharded by EP


def test_shared_experts_with_stacked_experts_are_refused():
    with pytest.raises(ValueError, match=r"moe.shared_experts \(1\) are gelu or swiglu FFNs, but moe.expert_type"):
        MoEConfig(expert_type="stacked", shared_experts=1)


def test_deepseek_style_config_trains(tmp_path, data_cache):
    """Fine-grained routed experts + a shared expert + aux-free balancing, through the CLI."""
    proc = train_ok(
        tmp_path / "run",
        data_cache,
        "moe.router={kind: topk, top_k: 4, score_func: sigmoid, renormalize: true, bias_update_rate: 0.001, "
        "load_balance_coeff: 0}",
        "moe.num_experts=8",
        "moe.expert_hidden=16",
        "moe.expert_type=swiglu",
        "moe.shared_experts=1",
        "moe.placement=replace_ffn",
        "train.steps=20",
        "train.eval_interval=10",
    )
    assert "error" not in proc.stderr.lower()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
