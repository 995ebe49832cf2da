"""DeepSpeed's private MoE API that expert parallelism relies on: fail loudly when a release changes it.

moetrain registers its own process groups in ``deepspeed.utils.groups`` (private module globals) and
tags expert parameters the way ``deepspeed.moe.utils.is_moe_param`` reads them. These tests pin that
contract on the installed DeepSpeed: if an upgrade renames or reshapes any of it, they fail here with
the name of what changed, not as a wrong gradient deep inside a training run.
"""

from __future__ import annotations

import inspect

import deepspeed
import pytest
import torch
from distributed import run_distributed, tiny_ep_model

from moetrain.moe.experts import is_expert_param
from moetrain.parallel import deepspeed_moe


def test_installed_deepspeed_has_the_private_moe_group_api():
    deepspeed_moe.check_deepspeed_moe_api()


@pytest.mark.parametrize("name", [*deepspeed_moe.GROUP_TABLES, *deepspeed_moe.GROUP_GETTERS, "_WORLD_GROUP"])
def test_a_changed_api_is_named_in_the_error(monkeypatch, name):
    from deepspeed.utils import groups

    monkeypatch.delattr(groups, name)
    with pytest.raises(RuntimeError, match=rf"deepspeed {deepspeed.__version__} changed .*{name}"):
        deepspeed_moe.check_deepspeed_moe_api()


def test_installed_deepspeed_partitions_autoep_experts_at_zero3():
    deepspeed_moe.check_deepspeed_zero3_moe_api()


@pytest.mark.parametrize("module,cls,method", deepspeed_moe.ZERO3_HOOKS)
def test_a_changed_zero3_api_is_named_in_the_error(monkeypatch, module, cls, method):
    import importlib

    monkeypatch.delattr(getattr(importlib.import_module(module), cls), method)
    with pytest.raises(RuntimeError, match=rf"deepspeed {deepspeed.__version__} changed how ZeRO-3 .*{cls}\.{method}"):
        deepspeed_moe.check_deepspeed_zero3_moe_api()


def _registered(rank: int, world: int) -> None:
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    model, layout = tiny_ep_model(2)
    name = deepspeed_moe.expert_group_name(2)
    # DeepSpeed's own lookups return our groups and our layout (EP = consecutive ranks)
    assert groups._get_expert_parallel_group(name) is layout.ep_group
    assert groups._get_expert_data_parallel_group(name) is layout.expert_dp_group
    assert groups._get_expert_parallel_group_dict()[name] is layout.ep_group
    assert groups._get_expert_data_parallel_group_dict()[name] is layout.expert_dp_group
    assert groups._get_expert_parallel_world_size(name) == 2
    assert groups._get_expert_parallel_rank(name) == rank
    assert groups._get_expert_broadcast_src_rank(name) == layout.expert_dp_ranks[0]
    # the engine finds the MoE marker and classifies exactly the expert parameters as MoE parameters
    assert sum(isinstance(m, MoE) for m in model.modules()) == 1
    for pname, p in model.named_parameters():
        assert is_moe_param(p) == is_expert_param(pname), pname
        if is_expert_param(pname):
            assert p.group_name == name and p.shape[1] == 2  # this rank's 2 of 4 experts
            assert not hasattr(p, deepspeed_moe.ZERO3_FAMILY_ATTR)  # ZeRO 0-2: no stage-3 placement


def _registered_for_zero3(rank: int, world: int) -> None:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    from deepspeed.moe.layer import MoE

    model, _ = tiny_ep_model(2, partition_weights=True)
    name = deepspeed_moe.expert_group_name(2)
    # stage 3 accepts the marker as an AutoEP layer, and finds no native MoE module (which it refuses)
    assert sum(isinstance(m, AutoEPMoELayer) for m in model.modules()) == 1
    assert not any(isinstance(m, MoE) for m in model.modules())
    for pname, p in model.named_parameters():
        family = getattr(p, deepspeed_moe.ZERO3_FAMILY_ATTR, "replicated")
        assert (family == deepspeed_moe.ZERO3_EXPERT_FAMILY) == is_expert_param(pname), pname
        if is_expert_param(pname):
            assert getattr(p, deepspeed_moe.ZERO3_GROUP_ATTR) == name


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_deepspeed_sees_moetrains_expert_groups_and_parameters():
    run_distributed(_registered, 2)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_zero3_tags_exactly_the_expert_parameters_with_autoeps_placement():
    run_distributed(_registered_for_zero3, 2)


def test_deepspeed_still_builds_its_shared_memory_op_where_moetrain_skips_it():
    """moetrain replaces ``deepspeed.comm.torch.build_shm_op`` (moetrain/parallel/layout.py) so that no start
    JIT-compiles DeepSpeed's inference all-reduce; a DeepSpeed that renames it would build it again."""
    import importlib

    # NOTE: not ``import deepspeed.comm.torch``: deepspeed.comm's own ``torch`` attribute (the torch module)
    # shadows the submodule of that name
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    from moetrain.parallel.layout import skip_shared_memory_comm_build

    assert callable(getattr(ds_torch, "build_shm_op", None))
    assert "build_shm_op()" in inspect.getsource(ds_torch.TorchBackend.__init__)
    skip_shared_memory_comm_build()
    assert ds_torch.build_shm_op() is None


def _zero0_engines(rank: int, world: int) -> None:
    from moetrain.training.engine import initialize_engine

    def build(precision: str, stage: int, default_allreduce: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        ds = {
            "train_micro_batch_size_per_gpu": 2,
            "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 1.0 if precision == "bf16" else 0.0,
        }
        engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=0.1), None, ds, world)
        if default_allreduce:
            engine.enable_backward_allreduce = True  # what DeepSpeed does on its own
        return engine

    for precision, stage in [("fp32", 0), ("bf16", 0), ("bf16", 1)]:
        engine = build(precision, stage, False)
        assert engine.enable_backward_allreduce == (stage != 0), (precision, stage)
        reference = build(precision, stage, True)
        x = torch.randn(2, 8).to(engine.module[0].weight.dtype)
        for e in (engine, reference):
            e.backward(e(x).float().square().sum())
            e.step()
        for p, q in zip(engine.module.parameters(), reference.module.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def _bf16_first_updates(rank: int, world: int) -> None:
    from moetrain.training.engine import initialize_engine

    def master_updates(stage: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        ds = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        engine = initialize_engine(model, optimizer, None, ds, world)
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        torch.manual_seed(1)
        for _ in range(3):
            x = torch.randn(2, 8).bfloat16()
            engine.backward(engine(x).float().square().sum())
            engine.step()
        return [p.detach().float() - b for p, b in zip(engine.module.parameters(), before)], type(engine.optimizer)

    unfused, kind0 = master_updates(0)
    zero1, kind1 = master_updates(1)
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    assert issubclass(kind0, FP16_UnfusedOptimizer) and kind1.__name__ == "DeepSpeedZeroOptimizer"
    for a, b in zip(unfused, zero1):  # equal up to a bf16 rounding of the weights (2^-8 of 0.03 per step)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_bf16_at_zero0_updates_as_zero1_does():
    """DeepSpeed's FP16_UnfusedOptimizer (bf16 at ZeRO-0) steps Adam once with zero gradients while it is
    built; moetrain undoes that step (unfused_bf16.undo_unfused_init_step), so three updates equal ZeRO-1's.
    Without the undo the first update is 0.74 lr (Adam's step-2 bias correction) and the weights decay
    once before training: 3 steps at lr 0.01 differ by up to 0.01."""
    run_distributed(_bf16_first_updates, 1)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_single_process_at_zero0_skips_the_gradient_allreduce_and_steps_alike():
    """One process at ZeRO-0 (fp32, and bf16 in DeepSpeed's FP16_UnfusedOptimizer) turns off DeepSpeed's
    gradient all-reduce, which there only flattens and copies back every gradient; the update is exactly
    the one DeepSpeed makes with it. ZeRO-1 keeps it (its reduction runs inside)."""
    run_distributed(_zero0_engines, 1)
