"""``train.compile``: the dense parts compiled (inductor on CPU) give the same losses and the same
checkpoint keys as the eager model; the MoE layers stay eager."""

import pytest
import torch
from conftest import read_metrics, run_train

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.model import MoETransformer

pytestmark = pytest.mark.timeout(600)

STEPS = 3
# Block 0 dense (compiled whole), block 1 MoE (its norms and attention compiled, the MoE layer eager).
TOPK = ["moe.router.kind=topk", "moe.router.top_k=2", "moe.placement=replace_ffn", "moe.expert_type=swiglu"]


def test_compile_keeps_parameter_names_and_loads_eager_weights():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    torch.manual_seed(0)
    eager = MoETransformer(cfg, MoEConfig(num_experts=4, placement="replace_ffn"))
    torch.manual_seed(0)
    compiled = MoETransformer(cfg, MoEConfig(num_experts=4, placement="replace_ffn"))
    compiled.compile_dense()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(compiled(x, x).loss, eager(x, x).loss)
    # the dense block and the MoE block's parts around its (eager) MoE layer became graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    compiled.load_state_dict(eager.state_dict())  # strict: the same names both ways
    eager.load_state_dict(compiled.state_dict())


def _run(tmp_path, data_cache, name: str, *overrides: str):
    run_dir = tmp_path / name
    proc = run_train(
        run_dir, data_cache, f"train.steps={STEPS}", "checkpoint.resume=none", *TOPK, *overrides, timeout=500
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_compiled_run_equals_eager_run(tmp_path, data_cache):
    from moetrain.checkpoint import consolidated_state_dict

    eager = _run(tmp_path, data_cache, "eager")
    # with recomputation too: backward re-runs the compiled graphs
    compiled = _run(tmp_path, data_cache, "compiled", "train.compile=true", "train.activation_checkpointing=block")
    la = [r["loss"] for r in read_metrics(eager) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(compiled) if "loss" in r]
    assert len(la) == len(lb) == STEPS
    assert lb == pytest.approx(la, rel=1e-5)
    va = [r["val_loss"] for r in read_metrics(eager) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(compiled) if "val_loss" in r]
    assert vb == pytest.approx(va, rel=1e-5)  # evaluation runs the compiled modules too (no grad)
    step = f"step_{STEPS:06d}"
    wa = consolidated_state_dict(eager / "checkpoints" / step)
    wb = consolidated_state_dict(compiled / "checkpoints" / step)
    assert list(wa) == list(wb)
