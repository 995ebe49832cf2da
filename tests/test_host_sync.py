"""The single-process MoE layer's forward + backward makes no host synchronisation.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

On CPU, :class:`HostSyncCounter` (``tests/host_sync.py``) recognises every operation that would
make the host wait on a GPU (``.item()``, ``.tolist()``, ``nonzero``, tensor -> bool, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ...) and names its source line. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` checks the same thing natively.
"""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncCounter

from moetrain.config.model import MoEConfig
from moetrain.kernels.runtime import triton_available
from moetrain.moe.layer import MoELayer

BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not triton_available(), reason="Triton cannot run: no CUDA and no interpreter"),
    ),
]


def _layer(kernels: str, top_k: int, capacity_factor: float | None, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=8,
        kernels=kernels,
        capacity_factor=capacity_factor,
        router={"kind": "topk", "top_k": top_k, "z_loss_coeff": 1e-3},
    )
    layer = MoELayer(cfg, d_model=64, d_hidden=128, vocab_size=256)
    return layer.to(device, dtype)


def _step(layer: MoELayer, device="cpu", dtype=torch.float32) -> None:
    x_TD = torch.randn(48, 64, device=device, dtype=dtype, requires_grad=True)
    token_ids_T = torch.randint(0, 256, (48,), device=device)
    out = layer(x_TD, token_ids_T)
    (out.y_TD.float().square().mean() + out.aux_loss).backward()


def test_counter_sees_every_kind_of_sync():
    """The counter is not vacuous: each known sync is caught, and the sync-free variants are not."""
    t = torch.tensor([2, 0, 1])
    with HostSyncCounter() as syncs:
        t.sum().item()
        t.tolist()
        bool(t[0] > 0)
        t.nonzero()
        t[t > 0]
        torch.repeat_interleave(t)
    assert [e.op.split(".")[1] for e in syncs.events] == [
        "_local_scalar_dense",
        "tolist",
        "_local_scalar_dense",
        "nonzero",
        "index",
        "repeat_interleave",
    ]
    assert all(e.where.startswith(__file__) for e in syncs.events), syncs.report()
    with HostSyncCounter() as syncs:
        torch.repeat_interleave(t, output_size=3)
        torch.arange(3).repeat_interleave(2)
        t[torch.tensor([0, 2])]
        torch.cumsum(t, 0)
        torch.tensor([1.0, 2.0])  # host data: counted only with host_data=True
    assert syncs.count == 0, syncs.report()
    with HostSyncCounter(host_data=True) as syncs:
        torch.tensor(2.0)
    assert [e.op for e in syncs.events] == ["aten.lift_fresh.default"]


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("top_k,capacity_factor", [(1, None), (2, None), (2, 1.25)])
def test_moe_layer_forward_backward_has_no_host_sync(kernels, top_k, capacity_factor):
    layer = _layer(kernels, top_k, capacity_factor)
    _step(layer)  # warm-up outside the counter (lazy initialisation may legitimately sync once)
    with HostSyncCounter() as syncs:
        _step(layer)
    assert syncs.count == 0, syncs.report()


def test_moe_layer_builds_no_tensor_from_host_data():
    layer = _layer("torch", 2, None)
    _step(layer)
    with HostSyncCounter(host_data=True) as syncs:
        _step(layer)
    assert syncs.count == 0, syncs.report()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("top_k,capacity_factor", [(2, None), (8, None), (2, 1.25)])
def test_moe_layer_has_no_host_sync_on_gpu(top_k, capacity_factor):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm (the sync-free expert GEMM) needs sm90+")
    layer = _layer("auto", top_k, capacity_factor, device="cuda", dtype=torch.bfloat16)
    assert layer.router.backend.name == "triton"
    _step(layer, "cuda", torch.bfloat16)  # warm-up: Triton compiles, caches fill
    torch.cuda.synchronize()
    x_TD = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    token_ids_T = torch.randint(0, 256, (48,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x_TD, token_ids_T)
        (out.y_TD.float().square().mean() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
