"""The memory planner (moetrain/planning/) against what the code really holds.

- parameter counts and optimizer groups equal the real model's and training's (exact);
- the activation formula equals the bytes the CPU allocator keeps between the forward and backward
  of a real model (profiler memory events), per activation-checkpointing mode;
- parameters, gradients and optimizer state equal what DeepSpeed's engine holds (exact), and the
  total is within 10 % of the allocator's peak of a training step (bench/plan_memory.py);
- ``moetrain plan`` / ``validate`` print a breakdown and a recommendation, never recommend a layout
  moetrain cannot run, and refuse bad input with one message (exit 2) before any setup.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli

from moetrain.config import load_config
from moetrain.planning.activations import Shapes, activation_terms
from moetrain.planning.estimate import Assumptions, Layout, estimate
from moetrain.planning.model_size import model_size, optimizer_groups
from moetrain.planning.search import Machine, search

TINY = REPO / "configs" / "tiny.yaml"
MODELS = {
    "stablemoe-insert": [],
    "gpt2-topk2-gelu": ["moe.router.kind=topk", "moe.router.top_k=2", "moe.placement=replace_ffn", "moe.every=2",
                        "moe.expert_type=gelu"],
    "llama-gqa-swiglu-shared": ["model.arch=llama", "model.n_kv_heads=2", "moe.router.kind=topk", "moe.router.top_k=2",
                                "moe.placement=replace_ffn", "moe.expert_type=swiglu", "moe.shared_experts=1"],
    "pyramid-residual": ["moe.router.kind=topk", "moe.placement=replace_ffn", "moe.every=2", "moe.expert_type=gelu",
                         "moe.residual=true", "moe.num_experts_per_layer=[4, 8]"],
}  # fmt: skip


def _cfg(*overrides: str):
    return load_config(TINY, ["model.vocab_size=257", *overrides])


@pytest.mark.parametrize("name", list(MODELS))
def test_counts_and_groups_equal_the_real_model_and_training(name):
    from moetrain.model import MoETransformer
    from moetrain.training.optim import isolate_tagged_params, param_groups

    cfg = _cfg(*MODELS[name])
    size = model_size(cfg.model, cfg.moe)
    torch.manual_seed(0)
    real = MoETransformer(cfg.model, cfg.moe)
    unique = {id(p): p for p in real.parameters()}
    assert size.total == sum(p.numel() for p in unique.values())
    assert size.expert == sum(p.numel() for n, p in real.named_parameters() if ".experts." in n)
    groups = isolate_tagged_params(real, param_groups(real, 0.1))
    assert [(g.name, g.numels) for g in optimizer_groups(real)] == [
        (g["name"], tuple(p.numel() for p in g["params"])) for g in groups
    ]


def _allocator_kept(cfg, recompute: str, batch: int) -> tuple[int, int]:
    """(bytes held at the end of the forward over its start, most backward adds on top), from the
    profiler's memory events, on a real model with its gradients allocated beforehand."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from moetrain.model import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe, recompute)
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    x = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    # one step first: the CPU experts' weight-gradient buffers (moe/grouped_cpu.py) are allocated once and
    # kept by the layer, so a training step's backward reuses them (persistent memory, not its working set)
    model(x, x).loss.backward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # backward accumulates into them: no gradient allocation is counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("@fwd"):
            out = model(x, x)
        with record_function("@bwd"):
            out.loss.backward()
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    t = np.array([m[0] for m in mem])
    live = np.cumsum([m[1] for m in mem])
    (f0, f1), (b0, b1) = [next((e.start_ns(), e.end_ns()) for e in events if e.name() == n) for n in ("@fwd", "@bwd")]

    def at(ts):
        i = int(np.searchsorted(t, ts))
        return int(live[i - 1]) if i else 0

    i, j = int(np.searchsorted(t, b0)), int(np.searchsorted(t, b1, side="right"))
    return at(f1) - at(f0), int(live[i:j].max()) - at(f1)


ACTIVATION_CASES = {
    "gpt2-topk2-gelu": (MODELS["gpt2-topk2-gelu"], 4),
    "llama-gqa-swiglu-shared": ([*MODELS["llama-gqa-swiglu-shared"], "data.seq_len=64"], 4),
    "stacked-insert-top1": (["moe.router.kind=topk"], 2),
    "bf16-top1-vocab2048": ([*MODELS["gpt2-topk2-gelu"], "moe.router.top_k=1", "train.precision=bf16",
                             "model.vocab_size=2048"], 4),
}  # fmt: skip


# NOTE: a known gap, kept visible: StableMoE's stacked experts with 2 sublayers under `block` recompute
# peak at 8.0 MB in backward where the formula says 5.4 MB (1 sublayer, and `moe` recompute, agree);
# the cause is not found yet (docs/parallelism.md, "Memory").
STACKED_BLOCK_GAP = pytest.mark.xfail(
    strict=True, reason="stacked experts x block recompute: working set under-planned"
)
# NOTE: a second known gap, from the merge onto the CPU experts' kept weight-gradient buffers
# (moe/grouped_cpu.py): their gradients no longer add to backward's working set, and under `moe`
# recompute the measured working set is then 4-5 % above the formula (3.33 vs 3.18 MB, 3.56 vs 3.43 MB);
# the missing part is not identified yet (`none` and `block` agree).
CPU_MOE_RECOMPUTE_GAP = pytest.mark.xfail(
    strict=True, reason="CPU experts x moe recompute: working set under-planned by 4-5 %"
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recompute", ["none", "moe", "block"])
@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_activation_formula_equals_the_allocator(case, recompute, request):
    if case == "stacked-insert-top1" and recompute == "block":
        request.applymarker(STACKED_BLOCK_GAP)
    if case in ("gpt2-topk2-gelu", "llama-gqa-swiglu-shared") and recompute == "moe":
        request.applymarker(CPU_MOE_RECOMPUTE_GAP)
    overrides, batch = ACTIVATION_CASES[case]
    cfg = _cfg(*overrides)
    kept, working = _allocator_kept(cfg, recompute, batch)
    b = 2 if cfg.train.precision == "bf16" else 4
    shapes = Shapes(batch * cfg.data.seq_len, cfg.data.seq_len, b, cfg.model, cfg.moe, device="cpu")
    terms = activation_terms(shapes, recompute)
    assert sum(terms.kept.values()) == pytest.approx(kept, rel=0.02), terms.kept
    # backward's working set is a model of its largest moment, conservative by design
    assert working * 0.97 <= terms.working_set <= working * 1.30, (terms.working_set, working, terms.working_set_of)


def _bench():
    sys.path.insert(0, str(REPO))
    from bench import plan_memory

    return plan_memory


BENCH_CASES = {
    "zero1-bf16-moe": (1, 1, ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "moe.num_experts=8",
                              "moe.router.top_k=2", "moe.expert_type=gelu", "moe.expert_hidden=128", "data.seq_len=64",
                              "train.micro_batch_size=4", "train.precision=bf16", "train.activation_checkpointing=moe",
                              "deepspeed.zero_optimization.stage=1", "train.zero_on_one_process=true"]),
    "ep2-zero2-ga2": (2, 2, ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "moe.num_experts=4",
                             "moe.router.top_k=2", "moe.expert_type=swiglu", "moe.expert_hidden=128", "data.seq_len=64",
                             "train.micro_batch_size=4", "train.grad_accum_steps=2",
                             "deepspeed.zero_optimization.stage=2"]),
}  # fmt: skip


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_states_are_exact_and_the_total_within_10_percent_of_a_training_step(case):
    world, ep, overrides = BENCH_CASES[case]
    # the least of two runs: the profiler's running sum only ever read high (bench/plan_memory.py)
    res = _bench().compare(case, world, ep, overrides, repeats=2)
    for key in ("parameters", "gradients", "optimizer"):  # of the busiest rank, planned for that rank
        assert res["planned"][key] == res["measured"][key], key
    assert abs(res["error"]["total_peak"]) <= 0.10, res


# few tokens and large experts, so that the optimizer step is the peak (moment C), with either of its two
# transients the larger: bf16's flattened partition beside its fp32 copy, or (expert-data-parallel 2, each
# rank's expert partition one whole stacked weight) the float64 copy of a gradient for its norm
STEP_CASES = {
    "ep2-zero2-bf16-flatten": (2, 2, ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "moe.num_experts=4",
                                      "moe.router.top_k=2", "moe.expert_type=swiglu", "moe.expert_hidden=1024",
                                      "data.seq_len=16", "train.micro_batch_size=1", "train.precision=bf16",
                                      "deepspeed.zero_optimization.stage=2"]),
    "ep2-world4-zero1-norm": (4, 2, ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "moe.every=2",
                                     "moe.num_experts=4", "moe.router.top_k=2", "moe.expert_type=gelu",
                                     "moe.expert_hidden=2048", "data.seq_len=16", "train.micro_batch_size=1",
                                     "deepspeed.zero_optimization.stage=1"]),
}  # fmt: skip


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_the_optimizer_steps_transient_is_the_peak_where_it_should_be(case):
    """ZeRO-1/2's step transients (moetrain/planning/states.py): the planned peak is the step's and within
    3 % of the measured one. Leaving out either transient read -8.1 % and -7.9 % on the bench's versions of
    these configurations (docs/benchmarks.md)."""
    world, ep, overrides = STEP_CASES[case]
    res = _bench().compare(case, world, ep, overrides, repeats=2)
    assert res["peak_moment"] == "C (optimizer step)", res
    assert abs(res["error"]["total_peak"]) <= 0.03, res


def test_zero3_is_runnable_ranks_after_lower_stages_and_never_offloads():
    cfg = _cfg(*MODELS["gpt2-topk2-gelu"], "moe.num_experts=8")
    size = model_size(cfg.model, cfg.moe)
    result = search(cfg, size, Machine(1, 4, 10 * 2**30), Assumptions(overhead=0))
    assert any(e.layout.zero == 3 for e in result.fitting)
    z3 = [e for e in result.estimates if e.layout.zero == 3]
    assert all(e.runnable for e in z3 if not e.layout.offload)
    assert all(not e.runnable and "ZeRO-1 or ZeRO-2" in e.why_not for e in z3 if e.layout.offload)
    # with everything else equal, a lower stage ranks first
    for i, e in enumerate(result.fitting):
        if e.layout.zero == 3:
            same = [
                f.layout.zero
                for f in result.fitting[:i]
                if (f.layout.ep, f.layout.recompute, f.layout.micro_batch, f.layout.offload)
                == (e.layout.ep, e.layout.recompute, e.layout.micro_batch, e.layout.offload)
            ]
            assert all(z < 3 for z in same)
    # no offload row is runnable where DeepSpeed's CPU Adam cannot be built
    no_adam = search(cfg, size, Machine(1, 4, 10 * 2**30), Assumptions(overhead=0, offload_buildable=False))
    assert not any(e.layout.offload for e in no_adam.fitting)


def test_expert_parallelism_and_zero_shrink_what_a_rank_holds():
    """The formula's direction, on a model where it matters: experts split over EP, optimizer state
    over the data-parallel ranks, activations by recomputation."""
    from moetrain.data.vocab import with_vocab_size

    # the trained BPE's configured size (32000): no data is needed
    cfg = with_vocab_size(load_config(REPO / "configs" / "gpu_base.yaml", ["train.precision=fp32"]))
    size = model_size(cfg.model, cfg.moe)
    base = Layout(8, 8, 1, 0, "none", False, 8, 4)

    def est(**change):
        return estimate(cfg, size, Layout(**{**base.__dict__, **change}), Assumptions())

    one, ep8 = est(), est(ep=8)
    assert ep8.states.parameters < one.states.parameters
    assert one.states.parameters - ep8.states.parameters == pytest.approx(size.expert * 7 / 8 * 4, rel=1e-3)
    assert one.states.optimizer == pytest.approx(8 * size.total, rel=1e-3)  # fp32 ZeRO-0: the Adam moments
    assert est(zero=1).states.optimizer == pytest.approx(12 * size.total / 8, rel=1e-3)  # + fp32 master, / dp
    assert est(recompute="block").activations_kept < est(recompute="moe").activations_kept < one.activations_kept


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", ["gpu_base.yaml", "plan_30b_moe.yaml"])
def test_plan_prints_a_breakdown_and_a_recommendation(config):
    proc = run_cli("plan", str(REPO / "configs" / config), "--gpus", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("parameters", "gradients", "optimizer state", "activations:", "backward working set",
                 "fixed overhead", "total per GPU", "layouts that fit", "recommended:", "overrides:"):  # fmt: skip
        assert line in out, line
    if config == "plan_30b_moe.yaml":
        assert "30,079,125,504 parameters" in out


@pytest.mark.timeout(120)
def test_a_layout_that_does_not_fit_is_reported():
    proc = run_cli("plan", str(REPO / "configs" / "plan_30b_moe.yaml"), "--gpus", "8", "--gpu-memory", "40GB")
    assert proc.returncode == 0, proc.stderr
    assert "this job's layout: EP 8 x expert-DP 1, ZeRO-2, recompute blocks" in proc.stdout
    assert "-- does NOT fit" in proc.stdout
    proc = run_cli("validate", str(REPO / "configs" / "plan_30b_moe.yaml"), "--world-size", "8", "--gpu-memory", "40GB")
    assert proc.returncode == 0, proc.stderr
    assert "memory per GPU (moetrain plan):" in proc.stdout and "warning:" in proc.stdout


BAD = {
    "no gpus": (["--gpus", "0"], "--gpus (0) must be >= 1"),
    "bad memory": (["--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory ('lots') is not a memory size"),
    "world cannot form the layout": (
        ["--gpus", "4"],
        "world size (4) must be divisible by moe.expert_parallel_size (8)",
    ),
    "offload without ZeRO-1/2": (
        ["--gpus", "8", "deepspeed.zero_optimization={stage: 0, offload_optimizer: {device: cpu}}"],
        "needs ZeRO stage 1 or 2",
    ),
    "parameter offload": (
        ["--gpus", "8", "deepspeed.zero_optimization.offload_param.device=cpu"],
        "parameter offload needs ZeRO-3",
    ),
    "imbalance below 1": (["--gpus", "8", "--imbalance", "0.5"], "--imbalance (0.5) must be >= 1"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_message_and_exit_2(case):
    args, message = BAD[case]
    proc = run_cli("plan", str(REPO / "configs" / "plan_30b_moe.yaml"), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1


@pytest.mark.parametrize(
    "config, extra",
    [
        ("dense_tiny.yaml", []),
        ("tiny.yaml", ["deepspeed.zero_optimization={stage: 2, offload_optimizer: {device: cpu}}"]),
    ],
)
def test_the_recommended_overrides_select_that_layout_of_the_same_model(config, extra):
    from moetrain.planning.report import job_layout

    cfg = load_config(REPO / "configs" / config, ["model.vocab_size=257", *extra])
    size = model_size(cfg.model, cfg.moe)
    machine = Machine(1, 2, 2**30)
    result = search(cfg, size, machine, Assumptions(overhead=0))
    offloading = job_layout(cfg, machine).offload
    for best in result.fitting[:3] + result.fitting[-3:]:
        again = load_config(
            REPO / "configs" / config, ["model.vocab_size=257", *extra, *best.layout.overrides(offloading)]
        )
        assert job_layout(again, machine) == best.layout
        assert model_size(again.model, again.moe) == size


@pytest.mark.parametrize("zero, precision, ep", [(0, "bf16", 2), (1, "bf16", 2), (0, "fp32", 2), (0, "bf16", 1)])
def test_the_planner_and_the_config_check_accept_bf16_at_zero0_under_ep(zero, precision, ep):
    """bf16 at ZeRO-0 under EP runs since moetrain's grouped step counts the experts in the norm
    (tests/test_unfused_bf16.py); planner and config check agree that every such layout runs."""
    from moetrain.planning.estimate import runnable_layout

    layout = Layout(
        world=2, procs_per_node=2, ep=ep, zero=zero, recompute="none", offload=False, micro_batch=4, grad_accum=1
    )
    assert runnable_layout(layout) == (True, None)
    overrides = [
        f"train.precision={precision}",
        f"moe.expert_parallel_size={ep}",
        f"deepspeed.zero_optimization={{stage: {zero}}}",
    ]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    assert (cfg.train.precision, cfg.moe.expert_parallel_size) == (precision, ep)
