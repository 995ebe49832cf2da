"""Backend selection, and the MoE layer giving the same results on the Triton and torch backends.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moetrain.config.model import MoEConfig
from moetrain.kernels import select_backend
from moetrain.kernels.backend import resolve_backend
from moetrain.kernels.runtime import triton_available
from moetrain.moe.layer import MoELayer

requires_triton = pytest.mark.skipif(
    not triton_available(), reason="Triton cannot run: no CUDA and TRITON_INTERPRET unset at import"
)


def test_torch_backend_is_the_reference():
    backend = select_backend("torch")
    assert backend.name == "torch"
    assert backend.topk_gating.__name__ == "topk_gating_reference"
    assert backend.permute.__name__ == "permute_reference"


# (kernels, triton installed, CUDA, TRITON_INTERPRET) -> backend, or the error's text
DECISIONS = [
    ("auto", True, True, False, "triton"),
    ("auto", True, True, True, "triton"),
    ("auto", True, False, True, "torch"),  # the interpreter is a test tool: never chosen by auto
    ("auto", True, False, False, "torch"),
    ("auto", False, True, False, "torch"),
    ("auto", False, False, False, "torch"),
    ("triton", True, True, False, "triton"),
    ("triton", True, False, True, "triton"),
    ("triton", True, False, False, "there is no CUDA device"),
    ("triton", False, True, False, "the triton package is not installed"),
    ("torch", True, True, False, "torch"),
    ("torch", False, False, False, "torch"),
]


@pytest.mark.parametrize("name,has_triton,has_cuda,interpreter,expected", DECISIONS)
def test_backend_decision_table(name, has_triton, has_cuda, interpreter, expected):
    if expected in ("triton", "torch"):
        assert resolve_backend(name, has_triton, has_cuda, interpreter) == expected
    else:
        with pytest.raises(RuntimeError, match=expected):
            resolve_backend(name, has_triton, has_cuda, interpreter)


@requires_triton
def test_triton_backend_where_triton_runs():
    assert select_backend("triton").name == "triton"


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        select_backend("cuda")  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_without_gpu_or_interpreter_auto_falls_back_and_triton_explains():
    """A fresh process with no GPU and no interpreter: auto -> torch, triton -> a clear error."""
    code = (
        "from moetrain.kernels import select_backend\n"
        "assert select_backend('auto').name == 'torch'\n"
        "try:\n"
        "    select_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "kernels: 'triton' cannot run here" in proc.stdout and "kernels: auto or torch" in proc.stdout


def _layer_step(kernels: str, top_k: int, capacity_factor: float | None, score_func: str):
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=8,
        kernels=kernels,
        capacity_factor=capacity_factor,
        router={"kind": "topk", "top_k": top_k, "score_func": score_func, "renormalize": top_k > 1},
    )
    layer = MoELayer(cfg, d_model=32, d_hidden=64, vocab_size=256)
    x_TD = torch.randn(70, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    token_ids_T = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(2))
    out = layer(x_TD, token_ids_T)
    w_TD = torch.randn(70, 32, generator=torch.Generator().manual_seed(3))
    ((out.y_TD * w_TD).sum() + out.aux_loss).backward()
    grads = {"x": x_TD.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out, grads


@requires_triton
@pytest.mark.parametrize(
    "top_k,capacity_factor,score_func", [(1, None, "sigmoid"), (2, None, "softmax"), (2, 1.0, "softmax")]
)
def test_moe_layer_same_on_triton_and_torch(top_k, capacity_factor, score_func):
    """Same weights, same batch: output, aux loss, routing stats and every gradient agree."""
    got, got_grads = _layer_step("triton", top_k, capacity_factor, score_func)
    ref, ref_grads = _layer_step("torch", top_k, capacity_factor, score_func)
    torch.testing.assert_close(got.y_TD, ref.y_TD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, ref.aux_loss)
    assert torch.equal(got.stats.load_E, ref.stats.load_E)
    assert torch.equal(got.stats.dropped, ref.stats.dropped)
    assert got_grads.keys() == ref_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
