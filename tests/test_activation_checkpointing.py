"""``train.activation_checkpointing``: recomputing in backward changes memory, never the numbers.

- one process: gradients, losses, stats and router buffers are bitwise the same for ``none``, ``moe`` and
  ``block`` (with dropout: the RNG state is preserved), for every router; fewer activation bytes are kept;
- expert parallelism (2 gloo processes): the same, and the recompute re-sends exactly the forward's rows;
- end to end: the per-step losses of CLI runs, one process and EP=2, match for the three settings.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import read_metrics, run_train
from distributed import ExchangeRecorder, run_distributed

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.parallel.layout import ParallelLayout
from moetrain.parallel.parallelize import parallelize

MODES = ("none", "moe", "block")
TOPK = {"num_experts": 4, "expert_hidden": 32, "router": {"kind": "topk", "top_k": 2}}
STABLE = {"num_experts": 4, "placement": "insert", "expert_type": "stacked", "router": {"kind": "stablemoe"}}
ROUTERS = {
    "topk": TOPK,
    "topk-auxfree": {"num_experts": 4, "router": {"kind": "topk", "bias_update_rate": 0.01, "load_balance_coeff": 0}},
    "stablemoe": STABLE,
    "base": {"num_experts": 4, "router": {"kind": "base"}},
    "hash": {"num_experts": 4, "router": {"kind": "hash"}},
    "expert_choice": {"num_experts": 4, "router": {"kind": "expert_choice", "top_k": 2}},
}
V, B, S = 64, 4, 16


def _model(mode: str, moe: dict, dropout: float = 0.1) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=S, dropout=dropout)
    return MoETransformer(cfg, MoEConfig(**moe), mode)


def _step(model: MoETransformer, seed: int = 1) -> dict:
    """One forward + backward; what it produced and how many activation bytes autograd kept."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)
    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(seed)  # dropout
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, y)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "aux": out.aux_loss.detach(),
        "loads": [s.load_E for s in out.moe_stats],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "kept_bytes": kept[0],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["aux"], b["aux"])
    assert all(torch.equal(x, y) for x, y in zip(a["loads"], b["loads"], strict=True))
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        assert torch.equal(a["grads"][name], b["grads"][name]), name
    assert a["buffers"].keys() == b["buffers"].keys()
    for name in a["buffers"]:  # e.g. the aux-loss-free router's pending counts: added once per forward
        assert torch.equal(a["buffers"][name], b["buffers"][name]), name


@pytest.mark.parametrize("router", list(ROUTERS))
def test_recompute_gives_identical_gradients_and_keeps_fewer_bytes(router):
    runs = {mode: _step(_model(mode, ROUTERS[router])) for mode in MODES}
    _assert_same(runs["none"], runs["moe"])
    _assert_same(runs["none"], runs["block"])
    assert runs["block"]["kept_bytes"] < runs["moe"]["kept_bytes"] < runs["none"]["kept_bytes"]


def test_stablemoe_stage2_and_aux_loss_gradient_recompute_identically():
    """Stage 2 routes by the frozen distilled router; the stage-1 aux loss has a gradient to the router."""
    from moetrain.moe.routers.stablemoe import RouterStage

    stage1 = {mode: _step(_model(mode, STABLE)) for mode in MODES}
    assert stage1["none"]["aux"] != 0
    assert any("centroids_ED" in n and g.abs().sum() > 0 for n, g in stage1["moe"]["grads"].items())
    runs = {}
    for mode in MODES:
        model = _model(mode, STABLE)
        for layer in model.moe_layers():
            layer.router.set_stage(RouterStage.FROZEN)
        runs[mode] = _step(model)
    _assert_same(runs["none"], runs["moe"])
    _assert_same(runs["none"], runs["block"])


def test_evaluation_does_not_recompute():
    """Eval mode keeps what it would keep without checkpointing (and no_grad keeps nothing)."""
    runs = {}
    for mode in MODES:
        model = _model(mode, TOPK)
        model.eval()
        runs[mode] = _step(model)
    assert runs["none"]["kept_bytes"] == runs["moe"]["kept_bytes"] == runs["block"]["kept_bytes"]
    _assert_same(runs["none"], runs["block"])


# --- expert parallelism: 2 gloo processes -------------------------------------------------------------


def _ep_check(rank: int, world: int) -> None:
    layout = ParallelLayout(rank, world, rank, ep_size=world, ep_group=dist.group.WORLD)
    for moe in (TOPK, STABLE):
        runs = {}
        for mode in MODES:
            model = parallelize(_model(mode, moe), layout)
            observers = [ExchangeRecorder() for _ in model.moe_layers()]
            for layer, obs in zip(model.moe_layers(), observers):
                layer.dispatcher.observer = obs
            runs[mode] = _step(model, seed=1 + rank)  # each rank its own tokens
            runs[mode]["sent"] = [obs.sent for obs in observers]
            assert all(sent and all(n > 0 for n in sent) for sent in runs[mode]["sent"])
        for mode in ("moe", "block"):
            _assert_same(runs["none"], runs[mode])
            # the recompute in backward exchanges again, exactly the forward's rows (the same routing)
            assert runs[mode]["sent"] == [sent * 2 for sent in runs["none"]["sent"]]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_recompute_under_expert_parallelism_is_identical():
    run_distributed(_ep_check, 2)


# --- end to end through the CLI -----------------------------------------------------------------------

STEPS = 4
CLI_CASES = {
    # the tiny config's StableMoE (inserted, stacked experts), across its stage switch
    "stablemoe": ["moe.router={kind: stablemoe, stage1_steps: 2}", "model.dropout=0.1"],
    "topk": ["moe.router.kind=topk", "moe.router.top_k=2", "moe.placement=replace_ffn", "moe.expert_type=swiglu"],
}


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _cli_losses(tmp_path, data_cache, case: str, nproc: int, ep: int) -> dict[str, list[float]]:
    out = {}
    for mode in MODES:
        run_dir = tmp_path / f"{case}-{mode}"
        args = [f"train.steps={STEPS}", "checkpoint.save_at_end=false", "checkpoint.resume=none"]
        args += [f"train.activation_checkpointing={mode}", f"moe.expert_parallel_size={ep}", *CLI_CASES[case]]
        proc = run_train(run_dir, data_cache, *args, nproc=nproc, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[mode] = _losses(run_dir)
        assert len(out[mode]) == STEPS
    return out


def _max_diff(losses: dict[str, list[float]]) -> float:
    return max(abs(a - b) for mode in ("moe", "block") for a, b in zip(losses["none"], losses[mode]))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_losses_equal_one_process(case, tmp_path, data_cache):
    losses = _cli_losses(tmp_path, data_cache, case, nproc=1, ep=1)
    assert _max_diff(losses) <= 1e-6, losses


@pytest.mark.multiproc
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_losses_equal_under_expert_parallelism(case, tmp_path, data_cache):
    losses = _cli_losses(tmp_path, data_cache, case, nproc=2, ep=2)
    assert _max_diff(losses) <= 1e-6, losses
