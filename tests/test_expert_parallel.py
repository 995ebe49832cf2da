"""Expert parallelism equals one process: same losses, grad-norms and final weights (fp32, gloo).

The single-process reference sees the same global micro-batch (micro_batch_size x world) as the
EP run, so every step is the same computation up to floating-point summation order.
Tolerance: per-step losses and grad-norms to rel 1e-5, every final weight to atol 2e-5.
"""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, TINY_CONFIG, clean_env, free_port, read_metrics, run_cli

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

STEPS = 5
COMMON = [
    *TINY,
    f"train.steps={STEPS}",
    "optim.lr=1e-2",
    # NOTE: Adam moves a weight whose gradient is ~0 by up to lr in the direction of the gradient's sign,
    # so summation-order noise in a near-zero gradient could flip a final weight by ~lr. eps 1e-6 makes
    # tiny-gradient updates proportional to the gradient, so the final weights compare at atol 2e-5.
    "optim.eps=1e-6",
    "moe.num_experts=4",
    "checkpoint.resume=none",
    "moe.router.kind=topk",
]


def torchrun(nproc, run_dir, data_cache, *overrides, timeout=400, launcher="torchrun"):
    """A real multi-process run: ``torchrun --standalone`` or the ``deepspeed`` launcher."""
    env = clean_env()
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    else:
        head = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={nproc}",
            f"--master_port={free_port()}",
            "--module",
        ]
    cmd = [
        *head,
        "moetrain.cli",
        "train",
        str(TINY_CONFIG),
        *COMMON,
        f"data.cache_dir={data_cache}",
        f"run_dir={run_dir}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def single(run_dir, data_cache, micro, *overrides):
    proc = run_cli(
        "train",
        str(TINY_CONFIG),
        *COMMON,
        f"data.cache_dir={data_cache}",
        f"run_dir={run_dir}",
        f"train.micro_batch_size={micro}",
        *overrides,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def final_weights(run_dir):
    from moetrain.checkpoint import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{STEPS:06d}")


def assert_same_run(a, b):
    ra = [r for r in read_metrics(a) if "loss" in r]
    rb = [r for r in read_metrics(b) if "loss" in r]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), (x["step"], x["grad_norm"], y["grad_norm"])
        assert x["moe/layer0/load"] == pytest.approx(y["moe/layer0/load"], abs=1e-3)  # every rank's experts
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name].float(), wb[name].float(), atol=2e-5), name
    assert any(".experts." in n and wa[n].shape[1] == 4 for n in wa)  # all 4 global experts compared


AUX_FREE = ["moe.router.bias_update_rate=0.05", "moe.router.load_balance_coeff=0"]
SHARED = ["moe.shared_experts=2", "moe.shared_expert_hidden=16", "moe.expert_type=swiglu", "moe.placement=replace_ffn"]
HF_OPTIONS = ["model.arch=llama", "model.head_dim=8", "model.qk_norm=head", "model.qkv_bias=true", "model.clip_qkv=8.0",
              "moe.shared_experts=1", "moe.shared_expert_gate=true", "moe.layers=[1]", "moe.expert_type=swiglu",
              "moe.placement=replace_ffn"]  # fmt: skip
RESIDUAL = ["moe.residual=true", "moe.expert_type=gelu", "moe.placement=replace_ffn"]
PYRAMID = ["moe.num_experts_per_layer=[2, 4]"]  # PR-MoE: 2 experts in block 0, 4 in block 1
STABLE = ["moe.router={kind: stablemoe, stage1_steps: 2}", "moe.placement=insert", "moe.expert_type=stacked"]
# DeepSeek-V3's arrangement: MLA + yarn, a dense first block, a shared expert, sigmoid routing limited to
# 1 of 2 groups (of 2 experts, one group per rank), a correction bias moved by the aux-free rate, scaled gates.
DEEPSEEK = [
    "model.arch=llama",
    "model.attention=mla",
    "model.mla={q_lora_rank: 16, kv_lora_rank: 12, qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 8}",
    "model.rope_scaling={kind: yarn, factor: 4, original_max_position_embeddings: 16, mscale: 1, mscale_all_dim: 1}",
    "moe.placement=replace_ffn",
    "moe.expert_type=swiglu",
    "moe.layers=[1]",
    "moe.shared_experts=1",
    "moe.router={kind: topk, top_k: 2, score_func: sigmoid, renormalize: true, num_groups: 2, topk_groups: 1, "
    "gate_scale: 2.5, correction_bias: true, bias_update_rate: 0.05, load_balance_coeff: 0}",
]

CASES = {
    # id: (world, ep, overrides)
    "top1-ep2-zero0": (2, 2, ["moe.router.top_k=1"]),
    "top2-ep2-zero1": (2, 2, ["moe.router.top_k=2", "deepspeed.zero_optimization.stage=1"]),
    "top2-ep2-zero2": (2, 2, ["moe.router.top_k=2", "deepspeed.zero_optimization.stage=2"]),
    "top2-ep4-zero0": (4, 4, ["moe.router.top_k=2", "moe.placement=replace_ffn", "moe.expert_type=swiglu"]),
    "top1-ep2-world4-zero2": (4, 2, ["moe.router.top_k=1", "deepspeed.zero_optimization.stage=2"]),
    # StableMoE across its switch (stage 2 from step 3 of 5): balance loss on global counts,
    # distilled router frozen by lr 0 inside the ZeRO partitions.
    "stablemoe-switch-ep2-zero0": (2, 2, STABLE),
    "stablemoe-switch-ep2-zero2": (2, 2, [*STABLE, "deepspeed.zero_optimization.stage=2"]),
    # Aux-loss-free balancing: the selection bias moves after every step from the global counts.
    "auxfree-seqaux-top2-ep2-zero1": (
        2,
        2,
        [*AUX_FREE, "moe.router.seq_aux_coeff=0.01", "moe.router.top_k=2", "deepspeed.zero_optimization.stage=1"],
    ),
    "auxfree-top1-ep4-zero0": (4, 4, [*AUX_FREE, "moe.router.top_k=1", "moe.router.score_func=sigmoid"]),
    "deepseek-groups-ep2-zero1": (2, 2, [*DEEPSEEK, "deepspeed.zero_optimization.stage=1"]),
    # Shared experts: replicated, data-parallel, beside the sharded routed experts.
    "shared-top2-ep2-zero2": (2, 2, [*SHARED, "moe.router.top_k=2", "deepspeed.zero_optimization.stage=2"]),
    # The Hugging Face families' options: q/k norm, q/k/v biases, head dim, clamp, a gated shared expert, a
    # dense block (their parameters replicated beside the sharded experts).
    "hf-options-top2-ep2-zero2": (2, 2, [*HF_OPTIONS, "moe.router.top_k=2", "deepspeed.zero_optimization.stage=2"]),
    # Null experts: slots routed to them are never sent; top-1 and top-2.
    "null-top2-ep2-zero1": (2, 2, ["moe.null_experts=2", "moe.router.top_k=2", "deepspeed.zero_optimization.stage=1"]),
    "null-top1-ep4-zero0": (4, 4, ["moe.null_experts=4", "moe.router.top_k=1"]),
    # Expert choice: each expert picks per sequence, so the rank a sequence lands on does not matter.
    "expertchoice-k2-ep2-zero2": (
        2,
        2,
        ["moe.router={kind: expert_choice, top_k: 2}", "deepspeed.zero_optimization.stage=2"],
    ),
    "expertchoice-k1-ep4-zero0": (4, 4, ["moe.router={kind: expert_choice, top_k: 1}"]),
    # moe.ep_overlap: the exchanges beside the experts' own rows, gradients through ZeRO's hooks
    "overlap-top2-ep2-zero2": (
        2,
        2,
        ["moe.ep_overlap=true", "moe.router.top_k=2", "deepspeed.zero_optimization.stage=2"],
    ),
    "overlap-stablemoe-switch-ep4-zero0": (4, 4, ["moe.ep_overlap=true", *STABLE]),
    # Residual MoE: a replicated dense FFN and mixing coefficient beside the sharded experts.
    "pr-moe-top1-ep2-zero1": (2, 2, [*RESIDUAL, *PYRAMID, "moe.router.top_k=1", "deepspeed.zero_optimization.stage=1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ep_equals_single_process(case, tmp_path, data_cache):
    world, ep, overrides = CASES[case]
    single(tmp_path / "one", data_cache, 2 * world, *overrides)
    torchrun(
        world, tmp_path / "ep", data_cache, "train.micro_batch_size=2", f"moe.expert_parallel_size={ep}", *overrides
    )
    assert_same_run(tmp_path / "one", tmp_path / "ep")


def test_deepspeed_launcher_ep_run_equals_single_process(tmp_path, data_cache):
    """The deepspeed launcher (2 processes, gloo) runs the same EP job; expert load covers all experts."""
    single(tmp_path / "one", data_cache, 4)
    torchrun(
        2, tmp_path / "ds", data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2", launcher="deepspeed"
    )
    assert_same_run(tmp_path / "one", tmp_path / "ds")
    rec = next(r for r in read_metrics(tmp_path / "ds") if "loss" in r)
    # tokens of both ranks (2 x 2 x 32, k=1) counted over the experts of both ranks
    assert sum(rec["moe/layer0/load"]) == pytest.approx(2 * 2 * 32)


def test_resume_under_ep_equals_uninterrupted_ep_run(tmp_path, data_cache):
    args = ["train.micro_batch_size=2", "moe.expert_parallel_size=2", "moe.router.top_k=2", "checkpoint.resume=auto"]
    torchrun(2, tmp_path / "full", data_cache, *args)
    torchrun(2, tmp_path / "split", data_cache, *args, "train.stop_at_step=2")
    proc = torchrun(2, tmp_path / "split", data_cache, *args)
    assert "resumed from" in proc.stdout
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    split = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r}
    assert split == full  # exact, every step
    wa, wb = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
