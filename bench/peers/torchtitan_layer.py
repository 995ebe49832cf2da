"""moetrain's MoE layer vs torchtitan's, forward + backward, same weights, same batch, ratios from one run.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

    python bench/peers/torchtitan_layer.py --threads 1                      # fp32 and bf16, all shapes
    python bench/peers/torchtitan_layer.py --threads 1 --retain-host-memory # freed memory kept (both sides)
    python bench/peers/torchtitan_layer.py --threads 1 --new-batch-every-rep # new routing every rep, as in training
    python bench/peers/torchtitan_layer.py --device cuda                     # bf16 on one GPU
    python bench/peers/torchtitan_layer.py --smoke                           # tiny shapes: plumbing only

torchtitan lives in its own virtual environment, never in moetrain's dependencies::

    python3 -m venv /work/venvs/peer-torchtitan
    /work/venvs/peer-torchtitan/bin/pip install torch==2.13.0        # or the CUDA build on a GPU machine
    /work/venvs/peer-torchtitan/bin/pip install -e .                 # moetrain (this checkout)
    /work/venvs/peer-torchtitan/bin/pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3
    /work/venvs/peer-torchtitan/bin/pip install einops tyro safetensors triton
    /work/venvs/peer-torchtitan/bin/python bench/peers/torchtitan_layer.py --threads 1

(``--no-deps``: torchtitan 0.3.0 pins ``datasets<4.8``, wandb and tensorboard, none of which its MoE
layer imports; ``triton`` is imported by ``torchtitan.distributed.minimal_async_ep`` at import time.)

The two layers compute the same function: a top-k softmax router (fp32 logits, gates renormalised
for k > 1), SwiGLU experts through ``torch._grouped_mm``, dropless, the gated sum of the k expert
outputs. moetrain's router adds no auxiliary loss here (``load_balance_coeff: 0``; torchtitan's layer
has none: its balancing is a bias updated outside the layer, ``load_balance_coeff=None``), but keeps
its per-forward statistics. torchtitan's experts are built from moetrain's weights (``w1_EFD[e] =
w1_SLDF[0, e].T``, ...). Before timing the script checks, per shape and dtype, that the parameter
counts are equal and that the outputs (relative norm of the difference) and the loss <y, w> (the
difference over sum |y * w|) agree within 1e-5 in fp32 and 2e-2 in bf16.

NOTE: torchtitan 0.3.0's ``GroupedExperts.forward`` casts the input and the weights to bf16 whatever
their dtype (its training runs the experts in bf16). The fp32 rows therefore run a subclass whose
forward is the same code without those casts, so both sides compute in the dtype of the row. Its
router asks for fp32 logits with ``torch.autocast(dtype=torch.float32)``, which CPU autocast does not
support (it warns and computes them in bf16, which changes the routing); the bf16 rows compute its
gate in fp32 as intended, as moetrain's router does.

Loss = <y, w> for a fixed random w; every step clears the gradients (``set_to_none``), as training
does. Variants run interleaved (moetrain, torchtitan, ...) after two warm-up rounds; medians of 11.
Ratios are torchtitan time / moetrain time (> 1: moetrain faster). Writes
bench/results/torchtitan_layer.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import env_info, fmt_table, interleaved_medians, write_json  # noqa: E402
from moetrain.config.model import MoEConfig  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.training.host_memory import retain_freed_memory  # noqa: E402

SEED = 0


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int


# cpu_tier.py's S1-cpu and S2-cpu, and a fine-grained one (64 experts, top-6, expert hidden a
# quarter of S1's dense width)
CPU_SHAPES = [
    Shape("S1-cpu/top1", 1024, 512, 1024, 8, 1),
    Shape("S1-cpu/top2", 1024, 512, 1024, 8, 2),
    Shape("S2-cpu/top2", 1024, 256, 512, 128, 2),
    Shape("S2-cpu/top8", 1024, 256, 512, 128, 8),
    Shape("FG-cpu/top6", 1024, 512, 256, 64, 6),
]
GPU_SHAPES = [
    Shape("S1/top2", 16384, 4096, 14336, 8, 2),
    Shape("S2/top8", 16384, 2048, 768, 128, 8),
    Shape("FG/top6", 16384, 2048, 1408, 64, 6),
]
SMOKE_SHAPES = [Shape("smoke/top2", 64, 32, 64, 8, 2)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def build_moetrain(shape: Shape) -> MoELayer:
    torch.manual_seed(SEED)
    cfg = MoEConfig(
        num_experts=shape.num_experts,
        expert_type="swiglu",
        capacity_factor=None,
        kernels="auto",
        router={"kind": "topk", "top_k": shape.top_k, "renormalize": shape.top_k > 1, "load_balance_coeff": 0.0},
    )
    return MoELayer(cfg, shape.d_model, shape.d_hidden, vocab_size=256)


def build_torchtitan(mt: MoELayer, shape: Shape, dtype: torch.dtype):
    """torchtitan's ``MoE`` holding copies of ``mt``'s router and expert weights."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    class SameDtypeGroupedExperts(GroupedExperts):
        """torchtitan's forward without its bf16 casts (see the module docstring)."""

        def forward(self, x_RD, num_tokens_per_expert_E):
            offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
            h_RF = F.silu(self._grouped_mm(A=x_RD, B_t=self.w1_EFD.transpose(-2, -1), offs=offsets_E))
            h_RF = h_RF * self._grouped_mm(A=x_RD, B_t=self.w3_EFD.transpose(-2, -1), offs=offsets_E)
            return self._grouped_mm(A=h_RF, B_t=self.w2_EDF.transpose(-2, -1), offs=offsets_E)

    E, K, D, Fh = shape.num_experts, shape.top_k, shape.d_model, shape.d_hidden
    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=Fh, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=D, out_features=E),
            top_k=K,
            score_func="softmax",
            route_norm=K > 1,
        ),
        load_balance_coeff=None,
    )
    tt = MoE(cfg)
    if dtype == torch.float32:
        inner = tt.routed_experts.inner_experts
        inner.__class__ = SameDtypeGroupedExperts  # same parameters, forward without the casts
    ex = mt.experts
    with torch.no_grad():
        tt.router.gate.weight.copy_(mt.router.weight_ED)
        tt.routed_experts.inner_experts.w1_EFD.copy_(ex.w1_SLDF[0].transpose(-2, -1))
        tt.routed_experts.inner_experts.w3_EFD.copy_(ex.w3_SLDF[0].transpose(-2, -1))
        tt.routed_experts.inner_experts.w2_EDF.copy_(ex.w2_SLFD[0].transpose(-2, -1))
    if dtype != torch.float32:
        gate = tt.router.gate  # fp32 logits, as torchtitan's autocast(float32) asks for (see the docstring)
        gate.forward = lambda x: F.linear(x.float(), gate.weight.float())
    tt.train()
    return tt


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(SEED)
    x_TD = torch.randn(shape.tokens, shape.d_model, generator=g).to(device, dtype).requires_grad_(True)
    w_TD = torch.randn(shape.tokens, shape.d_model, generator=g).to(device, torch.float32)
    token_ids_T = torch.randint(0, 256, (shape.tokens,), generator=g).to(device)
    return x_TD, token_ids_T, w_TD


def steps(mt, tt, x_TD, token_ids_T, w_TD, new_inputs: list[torch.Tensor] | None = None):
    """Two closures: forward + backward of loss = <y, w> on each layer, gradients cleared first.
    ``new_inputs``: moetrain's closure first copies the next of them into ``x_TD`` (in its own timing),
    so every round (moetrain, then torchtitan) routes a new batch, as training does."""
    rounds = itertools.cycle(new_inputs) if new_inputs else None

    def mt_step():
        if rounds is not None:
            with torch.no_grad():
                x_TD.copy_(next(rounds))
        mt.zero_grad(set_to_none=True)
        x_TD.grad = None
        out = mt(x_TD, token_ids_T)
        loss = (out.y_TD.float() * w_TD).sum() + out.aux_loss
        loss.backward()
        return loss.detach(), out.y_TD.detach()

    def tt_step():
        tt.zero_grad(set_to_none=True)
        x_TD.grad = None
        y_TD = tt(x_TD[None]).view_as(x_TD)
        loss = (y_TD.float() * w_TD).sum()
        loss.backward()
        return loss.detach(), y_TD.detach()

    return mt_step, tt_step


def check_same(shape: Shape, dtype, mt, tt, mt_step, tt_step, w_TD) -> dict:
    """Equal parameter counts; outputs and the first-step loss equal within the dtype's tolerance."""
    n_mt = sum(p.numel() for p in mt.parameters())
    n_tt = sum(p.numel() for p in tt.parameters())
    if n_mt != n_tt:
        raise RuntimeError(f"{shape.name}: parameter counts differ: moetrain {n_mt}, torchtitan {n_tt}")
    loss_mt, y_mt = mt_step()
    loss_tt, y_tt = tt_step()
    # relative to sum |y * w|: the loss is a sum of terms of both signs, so its own size can be far smaller
    rel_loss = float((loss_mt - loss_tt).abs() / (y_tt.float() * w_TD).abs().sum().clamp_min(1e-12))
    rel_y = float((y_mt.float() - y_tt.float()).norm() / y_tt.float().norm().clamp_min(1e-12))
    tol = TOLERANCE[dtype]
    if rel_loss > tol or rel_y > tol:
        raise RuntimeError(f"{shape.name} {dtype}: layers disagree (loss rel {rel_loss:.3g}, output rel {rel_y:.3g})")
    return {"params": n_mt, "loss_moetrain": float(loss_mt), "loss_torchtitan": float(loss_tt),
            "loss_rel_diff": rel_loss, "output_rel_diff": rel_y, "tolerance": tol}  # fmt: skip


def measure(shape: Shape, dtype: torch.dtype, device: torch.device, reps: int, new_batches: bool = False) -> dict:
    mt = build_moetrain(shape)
    tt = build_torchtitan(mt, shape, dtype)
    mt, tt = mt.to(device, dtype), tt.to(device, dtype)
    x_TD, token_ids_T, w_TD = make_inputs(shape, dtype, device)
    same = check_same(shape, dtype, mt, tt, *steps(mt, tt, x_TD, token_ids_T, w_TD), w_TD)
    pool = None
    if new_batches:  # warm-up rounds + reps, then again: every round a batch the layers have not seen
        g = torch.Generator().manual_seed(SEED + 1)
        pool = [torch.randn(x_TD.shape, generator=g).to(device, dtype) for _ in range(max(reps, 11) + 2)]
    mt_step, tt_step = steps(mt, tt, x_TD, token_ids_T, w_TD, pool)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = interleaved_medians({"moetrain": mt_step, "torchtitan": tt_step}, reps=reps, sync=sync)
    return {
        "shape": asdict(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "check": same,
        "times": t,
        "torchtitan/moetrain": t["torchtitan"]["median_s"] / t["moetrain"]["median_s"],
        "torchtitan/moetrain (CPU time)": t["torchtitan"]["cpu_median_s"] / t["moetrain"]["cpu_median_s"],
    }


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtypes", nargs="+", choices=("fp32", "bf16"), default=None, help="default: fp32 bf16 (cuda: bf16)"
    )
    p.add_argument("--shapes", nargs="+", default=None, help="shape names (default: all of the device's)")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--retain-host-memory", action="store_true", help="keep freed memory in the process (both sides)")
    p.add_argument(
        "--new-batch-every-rep", action="store_true",
        help="a new input, so new routing and expert row counts, every round (the same for both layers), as in "
        "training; without it every rep repeats one batch, whose GEMM shapes oneDNN's bf16 kernels cache",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="one tiny shape: checks the plumbing, numbers mean nothing")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "torchtitan_layer.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.retain_host_memory and not retain_freed_memory():
        p.error("--retain-host-memory needs glibc")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtypes or (["bf16"] if args.device == "cuda" else ["fp32", "bf16"])
    shapes = SMOKE_SHAPES if args.smoke else (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes]
    load_before, started = os.getloadavg(), time.perf_counter()
    rows = []
    for dt in dtypes:
        for shape in shapes:
            progress(f"{shape.name} {dt}")
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
            rows.append(measure(shape, dtype, device, args.reps, args.new_batch_every_rep))
    env = env_info(device)
    import torchtitan

    env["torchtitan"] = getattr(torchtitan, "__version__", "unknown")
    record = {
        "benchmark": "torchtitan_layer",
        "env": env,
        "smoke": args.smoke,
        "retain_host_memory": args.retain_host_memory,
        "new_batch_every_rep": args.new_batch_every_rep,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "elapsed_s": time.perf_counter() - started,
        "seed": SEED,
        "rows": rows,
    }
    path = write_json(args.out, record)
    table = [
        [r["shape"]["name"], r["dtype"], f"{r['times']['moetrain']['median_s'] * 1e3:.1f}",
         f"{r['times']['torchtitan']['median_s'] * 1e3:.1f}", f"{r['torchtitan/moetrain']:.2f}",
         f"{r['torchtitan/moetrain (CPU time)']:.2f}", f"{r['check']['loss_rel_diff']:.1e}"]
        for r in rows
    ]  # fmt: skip
    header = ["shape", "dtype", "moetrain ms", "torchtitan ms", "torchtitan/moetrain", "(CPU time)", "loss rel diff"]
    print(
        f"device: {env['device']} ({env['cpu_threads']} threads), torch {env['torch']}, torchtitan {env['torchtitan']}"
    )
    print(fmt_table(table, header))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
