"""``moe.ep_overlap``: the token exchanges run beside the experts' work on each rank's own rows.

- the schedule: every exchange is started before a chunk of expert work and waited for after it, in
  forward and in backward (recorded from the real calls, 2 gloo processes);
- a model step with and without overlap: the same loss, gradients and evaluation output (to fp32
  summation order), and in bf16 gradients as close to fp32's as the sequential path's;
  tests/test_all_to_all.py checks the dispatcher itself against one process;
- activation checkpointing turns it off (a recomputed layer keeps the sequential exchanges).
"""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.parallel import overlap
from moetrain.parallel.layout import ParallelLayout
from moetrain.parallel.parallelize import parallelize


@pytest.mark.parametrize(
    "counts, first, second",
    [
        ([3, 0, 2], [3, 0, 0], [0, 0, 2]),
        ([1, 1], [1, 0], [0, 1]),
        ([2, 3, 1], [2, 1, 0], [0, 2, 1]),
        ([0, 0], [0, 0], [0, 0]),
        ([5], [3], [2]),
    ],
)
def test_split_own_halves_rows_in_expert_order(counts, first, second):
    assert overlap.split_own(counts) == (first, second)


V, B, S = 64, 4, 16
MOES = {
    "topk-gelu": {"num_experts": 4, "expert_hidden": 32, "router": {"kind": "topk", "top_k": 2}},
    "stablemoe-stacked": {
        "num_experts": 4,
        "placement": "insert",
        "expert_type": "stacked",
        "router": {"kind": "stablemoe"},
    },
    "null-swiglu": {
        "num_experts": 4,
        "null_experts": 2,
        "expert_type": "swiglu",
        "router": {"kind": "topk", "top_k": 2},
    },
}


def _model(moe: dict, checkpointing: str = "none") -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=S, dropout=0.0)
    return MoETransformer(cfg, MoEConfig(**moe), checkpointing)


def _batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


class _Recorder:
    """Logs each exchange start, each wait, and each chunk's forward and backward."""

    def __init__(self, monkeypatch, experts_modules):
        self.events: list[str] = []
        real_all_to_all, real_backward = dist.all_to_all_single, overlap._Chunk.backward
        events = self.events

        class Work:
            def __init__(self, work):
                self.work = work

            def wait(self):
                events.append("wait")
                return self.work.wait()

        def all_to_all_single(*args, async_op=False, **kwargs):
            events.append("start")
            return Work(real_all_to_all(*args, async_op=async_op, **kwargs))

        def backward(chunk, *args):
            events.append("backward")
            return real_backward(chunk, *args)

        monkeypatch.setattr(overlap.dist, "all_to_all_single", all_to_all_single)
        monkeypatch.setattr(overlap._Chunk, "backward", backward)
        for m in experts_modules:
            m.register_forward_hook(lambda *_: events.append("experts"))


def _check(rank: int, world: int) -> None:
    layout = ParallelLayout(rank, world, rank, ep_size=world, ep_group=dist.group.WORLD)
    x, y = _batch(rank)
    for name, moe in MOES.items():
        runs = {}
        for on in (False, True):
            model = parallelize(_model({**moe, "ep_overlap": on}), layout)
            assert all(layer.dispatcher.overlap is on for layer in model.moe_layers())
            out = model(x, y)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            model.eval()
            with torch.no_grad():
                logits = model(x, y).logits
            runs[on] = (out.loss.detach(), grads, logits)
        (loss0, grads0, logits0), (loss1, grads1, logits1) = runs[False], runs[True]
        assert torch.allclose(loss0, loss1, rtol=0, atol=1e-6), (name, loss0, loss1)
        assert grads0.keys() == grads1.keys(), name
        for n in grads0:
            assert torch.allclose(grads0[n], grads1[n], rtol=1e-5, atol=1e-6), (name, n)
        assert torch.allclose(logits0, logits1, rtol=0, atol=1e-5), name
        assert any(g.abs().sum() > 0 for n, g in grads1.items() if ".experts." in n), name
    _check_bf16(layout, x, y)
    for mode in ("moe", "block"):  # a recomputed layer exchanges in sequence
        model = parallelize(_model({**MOES["topk-gelu"], "ep_overlap": True}, mode), layout)
        assert not any(layer.dispatcher.overlap for layer in model.moe_layers())


def _check_bf16(layout, x, y) -> None:
    """In bf16 the overlapped experts' gradients are as close to fp32's as the sequential ones: the
    chunks' weight gradients add up without losing precision beyond the sequential path's."""
    grads = {}
    for name, dtype, on in (
        ("fp32", torch.float32, False),
        ("seq", torch.bfloat16, False),
        ("ov", torch.bfloat16, True),
    ):
        model = parallelize(_model({**MOES["topk-gelu"], "ep_overlap": on}), layout).to(dtype)
        model(x, y).loss.backward()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if ".experts." in n}
    for n, ref in grads["fp32"].items():
        err_seq = (grads["seq"][n] - ref).norm() / ref.norm()
        err_ov = (grads["ov"][n] - ref).norm() / ref.norm()
        assert err_ov <= 1.1 * err_seq + 1e-3, (n, err_ov, err_seq)


def _check_schedule(rank: int, world: int) -> None:
    layout = ParallelLayout(rank, world, rank, ep_size=world, ep_group=dist.group.WORLD)
    model = parallelize(_model({**MOES["topk-gelu"], "ep_overlap": True}), layout)
    layer = model.moe_layers()[0]
    mp = pytest.MonkeyPatch()
    try:
        rec = _Recorder(mp, [layer.experts])
        g = torch.Generator().manual_seed(rank)
        x_TD = torch.randn(64, 32, generator=g, requires_grad=True)
        out = layer(x_TD, torch.zeros(64, dtype=torch.long))
        forward, rec.events[:] = list(rec.events), []
        out.y_TD.square().sum().backward()
        backward = list(rec.events)
    finally:
        mp.undo()
    # the count exchange (beside the permute), then each token exchange beside a chunk: own rows (a),
    # received rows, own rows (b); in backward the same in reverse
    assert forward == ["start", "wait", "start", "experts", "wait", "experts", "start", "experts", "wait"], forward
    assert backward == ["start", "backward", "wait", "backward", "start", "backward", "wait"], backward


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_overlapped_model_step_equals_sequential():
    """top-k GELU, StableMoE stacked experts, null experts with SwiGLU: loss, every gradient, eval logits."""
    run_distributed(_check, 2)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_each_exchange_runs_beside_a_chunk_of_expert_work():
    run_distributed(_check_schedule, 2)
