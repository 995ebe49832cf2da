"""``moe.router.trainable: false``: a frozen router (docs/finetuning.md).

Its parameters do not require gradients and are in no optimizer group; trained with the CLI, the router's
weights stay bit for bit what they were while the experts move, through a checkpoint and a resume.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_train, train_ok

from moetrain.config import config_from_dict
from moetrain.inference.loading import load_checkpoint
from moetrain.model import MoETransformer
from moetrain.training.optim import param_groups


def tiny_model(trainable: bool) -> MoETransformer:
    cfg = config_from_dict(
        {"model": {"arch": "llama", "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "vocab_size": 64},
         "moe": {"num_experts": 4, "router": {"kind": "topk", "top_k": 2, "trainable": trainable}}}
    )  # fmt: skip
    return MoETransformer(cfg.model, cfg.moe)


def test_a_frozen_router_is_in_no_optimizer_group():
    model = tiny_model(trainable=False)
    routers = {id(p) for n, p in model.named_parameters() if ".router." in n}
    assert routers and not any(p.requires_grad for n, p in model.named_parameters() if ".router." in n)
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not routers & grouped
    assert grouped == {id(p) for n, p in model.named_parameters() if ".router." not in n}
    trained = tiny_model(trainable=True)  # the default: every parameter in a group
    assert sum(len(g["params"]) for g in param_groups(trained, 0.1)) == len(list(trained.parameters()))


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    model = load_checkpoint(run / "checkpoints" / f"step_{step:06d}").model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.timeout(300)
def test_router_weights_stay_while_experts_train_through_a_resume(tmp_path, data_cache):
    run = tmp_path / "run"
    frozen = [
        "moe.router={kind: topk, top_k: 2, trainable: false}",
        "checkpoint.interval=2",
        "checkpoint.keep_last=5",
        "train.eval_interval=0",
    ]
    train_ok(run, data_cache, "train.steps=4", *frozen)
    train_ok(run, data_cache, "train.steps=6", *frozen)  # resumes from step 4
    unfrozen = [f.replace("trainable: false", "trainable: true") for f in frozen]
    refused = train_ok(run, data_cache, "train.steps=8", *unfrozen, expect=2)  # the optimizer state has no router
    assert "moe.router.trainable: False -> True" in refused.stderr
    first, last = _weights(run, 2), _weights(run, 6)
    routers = [n for n in first if ".router." in n]
    assert routers
    for name in routers:
        assert torch.equal(first[name], last[name]), name
    experts = [n for n in first if ".experts." in n]
    assert all(not torch.equal(first[n], last[n]) for n in experts)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_a_frozen_router_stays_under_ep_2_and_zero_2(tmp_path, data_cache):
    """ZeRO-2 steps flat partitions of the parameters in its groups: the frozen router is in none."""
    run = tmp_path / "run"
    frozen = ["moe.router={kind: topk, top_k: 2, trainable: false}", "checkpoint.interval=2", "checkpoint.keep_last=5",
              "train.eval_interval=0", "train.steps=4", "train.micro_batch_size=2", "moe.expert_parallel_size=2",
              "deepspeed.zero_optimization.stage=2"]  # fmt: skip
    proc = run_train(run, data_cache, *frozen, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, last = _weights(run, 2), _weights(run, 4)
    assert all(torch.equal(first[n], last[n]) for n in first if ".router." in n)
    assert all(not torch.equal(first[n], last[n]) for n in first if ".experts." in n)
