"""ZeRO-3 under expert parallelism: DeepSpeed's stage 3 partitions the shared parameters over all ranks and
each expert over its expert-data-parallel group (docs/parallelism.md, "ZeRO-3").

- 1 process vs 2 and 4 (EP 1 and 2): the same per-step losses and grad-norms (rel 1e-5) and final weights
  of every global expert (atol 2e-5), fp32 -- top-k, expert choice and null experts, also across
  StableMoE's switch with recomputed MoE layers, and in bf16 to bf16 rounding with an exact resume;
- the parameter bytes each rank holds, measured from its partitions (the trainer's start line), equal the
  single-process model's bytes split 1/world per parameter (rounded up, as stage 3 pads);
- a rank that receives no token from the all-to-all still gathers its experts and takes part in every
  collective: no hang, and the same losses and weights as one process.

``stage3_param_persistence_threshold: 0`` makes stage 3 partition every parameter: its default keeps
parameters of up to 1e5 elements whole on every rank, which is all of the tiny model's.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from conftest import read_metrics
from distributed import run_distributed
from test_expert_parallel import STABLE, STEPS, assert_same_run, final_weights, single, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]

ZERO3 = ["deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]

CASES = {
    # id: (world, ep, overrides)
    "top2-ep2-world2": (2, 2, ["moe.router.top_k=2"]),
    # expert-DP 2: each expert's partition is half of it, on the two ranks that hold it
    "top1-ep2-world4": (4, 2, ["moe.router.top_k=1"]),
    # EP 1: the experts are ordinary parameters, partitioned over all ranks; whole blocks recomputed (a dense
    # block's FFN output projection is gathered for its backward before the recompute starts)
    "top2-ep1-world2-recompute-block": (2, 1, ["moe.router.top_k=2", "train.activation_checkpointing=block"]),
    # the distilled router frozen mid-run (requires_grad off, lr 0 in its group); MoE layers recomputed
    "stablemoe-switch-ep2-recompute-moe": (2, 2, [*STABLE, "train.activation_checkpointing=moe"]),
    # routers whose decisions leave slots unsent: expert choice (per sequence), null experts
    "expertchoice-k2-ep2": (2, 2, ["moe.router={kind: expert_choice, top_k: 2}"]),
    "null-top2-ep2": (2, 2, ["moe.null_experts=2", "moe.router.top_k=2"]),
}

HELD = re.compile(
    r"ZeRO-3: parameter bytes held per rank: dense \[([\d, ]+)\] of (\d+), experts \[([\d, ]+)\] of (\d+)"
)


def held_bytes(stdout: str) -> dict[str, tuple[list[int], int]]:
    """The trainer's measured bytes: {"dense"|"experts": (per rank, whole model)}."""
    m = HELD.search(stdout)
    assert m, stdout[-3000:]
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    return {"dense": (ints(m[1]), int(m[2])), "experts": (ints(m[3]), int(m[4]))}


def expected_bytes(weights: dict[str, torch.Tensor], world: int, ep: int) -> dict[str, tuple[int, int]]:
    """From the single-process model (fp32): {kind: (bytes per rank, whole)}. A shared parameter's partition
    is ceil(numel / world) elements; an expert parameter's is ceil(numel / ep / (world / ep)) on each of its
    expert-data-parallel ranks."""
    out = {"dense": [0, 0], "experts": [0, 0]}
    for name, w in weights.items():
        kind = "experts" if ".experts." in name else "dense"
        local = w.numel() // ep if kind == "experts" else w.numel()
        parts = world // ep if kind == "experts" else world
        out[kind][0] += math.ceil(local / parts) * 4
        out[kind][1] += w.numel() * 4
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_zero3_ep_equals_single_process_and_holds_one_part_in_world(case, tmp_path, data_cache):
    world, ep, overrides = CASES[case]
    single(tmp_path / "one", data_cache, 2 * world, *overrides)
    proc = torchrun(
        world,
        tmp_path / "z3",
        data_cache,
        "train.micro_batch_size=2",
        f"moe.expert_parallel_size={ep}",
        *ZERO3,
        *overrides,
    )
    assert "inside DeepSpeed's DeepSpeedZeroOptimizer_Stage3" in proc.stdout
    assert_same_run(tmp_path / "one", tmp_path / "z3")
    held, want = held_bytes(proc.stdout), expected_bytes(final_weights(tmp_path / "one"), world, ep)
    for kind in ("dense", "experts"):
        per_rank, whole = held[kind]
        assert whole == want[kind][1], (kind, whole, want[kind])  # the whole model, counted on the partitions
        assert per_rank == [want[kind][0]] * world, (kind, per_rank, want[kind])
        # ~1/world of it: stage 3 pads each parameter's last partition by fewer than `world` elements
        assert whole / world <= per_rank[0] < whole / world * 1.02, (kind, per_rank[0], whole / world)


BF16 = ["train.precision=bf16", "moe.router.top_k=2"]


def test_zero3_bf16_under_ep_equals_one_process_and_resumes_exactly(tmp_path, data_cache):
    """bf16 weights in stage 3's partitions, fp32 masters and moments in its flat groups: losses and grad
    norms within bf16 rounding of one ZeRO-3 process (as tests/test_bf16_optimizer.py; bf16 under ZeRO-0
    is another optimizer, with bf16 gradients), and a run stopped at step 2 resumes to exactly the
    uninterrupted run's losses (every partition restored bit for bit)."""
    single(tmp_path / "one", data_cache, 4, *ZERO3, *BF16)
    args = ["train.micro_batch_size=2", "moe.expert_parallel_size=2", "checkpoint.resume=auto", *ZERO3, *BF16]
    proc = torchrun(2, tmp_path / "full", data_cache, *args)
    held, want = held_bytes(proc.stdout), expected_bytes(final_weights(tmp_path / "one"), 2, 2)
    for kind in ("dense", "experts"):
        assert held[kind] == ([want[kind][0] // 2] * 2, want[kind][1] // 2), kind  # bf16: half of fp32's bytes
    a = [r for r in read_metrics(tmp_path / "one") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-2), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=5e-2), (x["step"], x["grad_norm"], y["grad_norm"])
    torchrun(2, tmp_path / "split", data_cache, *args, "train.stop_at_step=2")
    proc = torchrun(2, tmp_path / "split", data_cache, *args)
    assert "resumed from" in proc.stdout
    full = {r["step"]: r["loss"] for r in b}
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r} == full


# --- a rank that receives no token ------------------------------------------------------------------------

LR, CLIP, MICRO = 1e-2, 0.5, 4


def _route_all_to_expert_0(model) -> None:
    """Every router's decision with each token's experts replaced by expert 0 (held by EP rank 0), top-1;
    the gates are the router's own, so its weights still get gradients."""
    from moetrain.moe.layer import MoELayer

    for layer in model.modules():
        if isinstance(layer, MoELayer):
            real = layer.router.forward

            def forward(x_TD, token_ids_T, group_size=None, real=real):
                d = real(x_TD, token_ids_T, group_size)
                return dataclasses.replace(d, expert_ids_TK=torch.zeros_like(d.expert_ids_TK))

            layer.router.forward = forward


def _rows_seen(model) -> list[int]:
    """Rows every call of the model's experts gets."""
    from moetrain.moe.experts import GroupedExperts

    seen: list[int] = []
    for experts in model.modules():
        if isinstance(experts, GroupedExperts):
            experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


def _empty_rank(rank: int, world: int, recompute: str) -> None:
    import deepspeed

    from moetrain.config.job import JobConfig
    from moetrain.model import MoETransformer
    from moetrain.parallel.deepspeed_moe import register_expert_parallel
    from moetrain.parallel.layout import ParallelLayout
    from moetrain.parallel.parallelize import parallelize
    from moetrain.training import engine as ds_engine
    from moetrain.training import state_io
    from moetrain.training.held_bytes import held_parameter_bytes
    from moetrain.training.optim import param_groups

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # joins this group
    layout = ParallelLayout.init(ep_size=2)
    cfg = JobConfig.model_validate(
        {
            "model": {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "max_seq_len": 8},
            "moe": {
                "num_experts": 4,
                "expert_type": "swiglu",
                "router": {"kind": "topk", "top_k": 1},
                "shared_experts": 1,  # a module with parameters last in the MoE layer's recompute region
                "shared_expert_hidden": 16,
            },
            "data": {"seq_len": 8},
            "train": {"micro_batch_size": MICRO},
            "optim": {"lr": LR, "grad_clip": CLIP, "eps": 1e-6},
            "deepspeed": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
        }
    )

    def build() -> MoETransformer:
        torch.manual_seed(0)
        model = MoETransformer(cfg.model, cfg.moe, recompute)
        _route_all_to_expert_0(model)
        return model

    def adamw(groups):
        return torch.optim.AdamW(groups, lr=LR, betas=cfg.optim.betas, eps=cfg.optim.eps)

    batches = [torch.randint(0, 64, (world * MICRO, 9), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    # the reference: one process, the global batch, torch's AdamW and clipping
    ref = build()
    opt = adamw(param_groups(ref, cfg.optim.weight_decay))
    ref_losses = []
    for tokens in batches:
        out = ref(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        ref_losses.append(out.loss.item())

    # the same under EP 2 and ZeRO-3, this rank's slice of each batch
    model = parallelize(build(), layout)
    register_expert_parallel(model, layout, partition_weights=True)
    seen = _rows_seen(model)
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay, layout.ep_size))
    ds_config = ds_engine.build_ds_config(cfg, world)
    engine = ds_engine.initialize_engine(model, optimizer, None, ds_config, world)
    partitions = held_parameter_bytes(model)
    for step, tokens in enumerate(batches):
        mine = tokens[rank * MICRO : (rank + 1) * MICRO]
        out = engine(mine[:, :-1], mine[:, 1:])
        engine.backward(out.loss)
        engine.step()
        loss = out.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        assert loss.item() / world == pytest.approx(ref_losses[step], rel=1e-5), (step, loss.item() / world)
    assert held_parameter_bytes(model) == partitions  # every gathered parameter released again
    calls = len(model.moe_layers()) * len(batches) * (2 if recompute != "none" else 1)  # recomputed in backward
    if layout.ep_rank == 1:  # only the pad row of the all-to-all dispatcher, every call
        assert seen == [1] * calls, seen
    else:
        assert seen == [MICRO * 8 * world] * calls, seen
    reference = dict(ref.named_parameters())
    for name, _p, entry in state_io.full_state(model, engine.optimizer):
        want = reference[name].detach()
        if ".experts." in name:
            first = model.get_submodule(name.rsplit(".", 1)[0]).first_expert
            want = want[:, first : first + entry["value"].shape[1]]
        assert torch.allclose(entry["value"], want, atol=2e-5), name


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recompute", ["none", "moe", "block"])
def test_zero3_rank_that_receives_no_token_takes_part_and_matches_one_process(recompute):
    """Also under activation checkpointing: a recompute inside backward gathers and releases parameters
    again (moetrain/training/zero3.py keeps those gathered for their backward), and afterwards each rank
    holds only its partitions again."""
    run_distributed(_empty_rank, 2, recompute)
