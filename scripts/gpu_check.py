"""The one prepared GPU check: everything moetrain claims about a CUDA GPU, checked in one run.

    bash scripts/gpu_check.sh                  # on a machine with one CUDA GPU (H100/H200: ~8 min, estimated)
    bash scripts/gpu_check.sh --smoke          # the same steps on the CPU, tiny and short (the test suite)

Steps, each recorded as pass / fail with its numbers and its duration:

1. ``gpu_tests``: the ``gpu``-marked tests (Triton kernels against their references, host syncs).
2. ``train_*``: ``configs/tiny.yaml`` (fp32, StableMoE) and ``configs/gpu_swiglu_top2.yaml`` (bf16,
   SwiGLU, top-2) trained with the Triton kernels and with the torch kernels: the per-step losses of
   the two must agree (fp32: 1e-3 relative, bf16: 3e-2), and whether the experts fell back to the
   per-expert loop is recorded.
3. ``host_syncs``: forward + backward of an MoE layer (top-2 SwiGLU bf16, and StableMoE) under
   ``torch.cuda.set_sync_debug_mode("error")``, which raises on any host sync (CPU: the
   ``HostSyncCounter`` stand-in).
4. ``bench``: ``bench/gpu_tier.py`` (G0-G6), its JSON copied beside the summary.
5. ``e2e``: ``bench/e2e_lm.py --device cuda`` (moetrain's trainer vs the same LM on ``deepspeed.moe``,
   bf16, one process per side) at top-2 with 8 and 32 experts, on a model sized for a GPU
   (:data:`GPU_E2E_MODEL`); smoke: one CPU shape in bf16, a few steps.
6. ``nccl_resume``: ``configs/gpu_swiglu_top2.yaml`` under ``torchrun --nproc-per-node 1`` with
   ``MOETRAIN_FORCE_COLLECTIVES=1``: the all-to-all dispatcher over a group of one and every collective of
   training and checkpointing run on NCCL at world size 1; a run stopped at half, checkpointed and resumed
   gives exactly (``==``) the losses of the uninterrupted run, in fp32 and bf16 (smoke: gloo).
7. ``uninitialised_rows``: the MoE layer in capacity mode, with null experts and with expert choice, in
   bf16, a few SGD steps in process under ``torch.use_deterministic_algorithms(True)`` (which fills fresh
   allocations with NaN): every loss finite, the Triton kernels' losses equal the torch kernels' (3e-2).

The ``gpu_tests`` step fails when every selected test skipped (on the GPU the ``gpu``-marked tests; in the
smoke run the host-sync tests); ``host_syncs`` reports the counted syncs and proves the counter is live by
catching one deliberate sync.
8. ``torchtitan_layer``: ``bench/peers/torchtitan_layer.py --device cuda`` (moetrain's MoE layer
   against torchtitan's on copied weights, bf16, forward + backward) with the python of torchtitan's
   own environment (``--torchtitan-python``); smoke: one tiny CPU shape. Recorded as skipped, not
   failed, when that python cannot import torchtitan.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``; exits 1 if any step failed (a skipped
step is not a failure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the in-process steps run the Triton kernels interpreted

from moetrain.parallel.layout import LAUNCHER_VARS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_MODEL = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=32",
    "moe.num_experts=4", "moe.expert_hidden=32", "data.seq_len=32", "data.max_tokens=200000",
    "train.micro_batch_size=4", "train.eval_batches=2", "train.eval_interval=0", "logging.interval=1",
    "optim.warmup_steps=2", "moe.every=1",
]  # fmt: skip
GPU_E2E_MODEL = [  # bench/e2e_lm.py's LM widened so that a step is not only kernel launches
    "model.d_model=512", "model.n_heads=8", "model.d_ff=2048", "moe.expert_hidden=2048",
    "model.max_seq_len=512", "data.seq_len=512", "train.micro_batch_size=16",
]  # fmt: skip
TRAIN_RUNS = {  # name -> (config, relative loss tolerance between the Triton and the torch kernels)
    "tiny_fp32": ("configs/tiny.yaml", 1e-3),
    "swiglu_top2_bf16": ("configs/gpu_swiglu_top2.yaml", 3e-2),
}


class StepSkippedError(Exception):
    """A step that cannot run here for a reason outside moetrain (a peer not installed): not a failure."""


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.out = Path(args.out).resolve()
        self.steps = args.steps or (3 if self.smoke else 100)
        self.bench_args = args.bench_args
        self.peer_python = args.torchtitan_python
        self.cache = self.out / "data_cache"
        self.record: dict = {"mode": "smoke" if self.smoke else "gpu", "env": environment(), "steps": {}}

    # --- running steps --------------------------------------------------------------------------

    def step(self, name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            entry = {"status": "pass", **fn()}
        except StepSkippedError as exc:
            entry = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failed step is recorded, the others still run
            entry = {"status": "fail", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.record["steps"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        if entry["status"] != "pass":
            print(entry.get("error") or entry.get("reason"), flush=True)

    def run(self, cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> str:
        full_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("PYTEST_")}
        full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2500:]}"
            )
        return proc.stdout + proc.stderr

    # --- the steps ------------------------------------------------------------------------------

    def gpu_tests(self) -> dict:
        """The gpu-marked tests (smoke, on the CPU where they skip: the host-sync tests, unmarked)."""
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["tests/test_host_sync.py", "-m", "not gpu"] if self.smoke else ["tests", "-m", "gpu"]
        summary = pytest_summary(self.run(cmd, timeout=900))
        check_some_passed(summary)
        return {"summary": summary}

    def train(self, name: str) -> dict:
        config, tol = TRAIN_RUNS[name]
        runs = {kernels: self._train_once(name, config, kernels) for kernels in ("triton", "torch")}
        a, b = runs["triton"]["loss"], runs["torch"]["loss"]
        if sorted(a) != sorted(b) or not a:
            raise RuntimeError(f"logged steps differ: {sorted(a)} vs {sorted(b)}")
        rel = max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-6) for s in a)
        out = {"max_rel_loss_diff": rel, "tolerance": tol, "runs": runs}
        if rel > tol:
            raise RuntimeError(f"Triton and torch kernels disagree: max relative loss difference {rel:.3g} > {tol}")
        return out

    def _train_once(self, name: str, config: str, kernels: str) -> dict:
        run_dir = self.out / "runs" / f"{name}_{kernels}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"train.steps={self.steps}", f"moe.kernels={kernels}", f"run_dir={run_dir}",
                     f"data.cache_dir={self.cache}", "checkpoint.resume=none", "checkpoint.interval=0",
                     "checkpoint.save_at_end=false", "logging.progress=off"]  # fmt: skip
        if self.smoke:
            overrides += SMOKE_MODEL
        env = {"TRITON_INTERPRET": "1"} if self.smoke and kernels == "triton" else {}
        t0 = time.perf_counter()
        self.run([sys.executable, "-m", "moetrain.cli", "train", config, *overrides], env=env)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "loss" in r]
        speeds = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
        return {
            "loss": {r["step"]: r["loss"] for r in train},
            "final_val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
            "median_tokens_per_s": sorted(speeds)[len(speeds) // 2],
            "grouped_gemm_fallback_layers": train[-1].get("moe/grouped_gemm_fallback_layers"),
            "wall_s": round(wall, 1),
        }

    def host_syncs(self) -> dict:
        from moetrain.config.model import MoEConfig

        cases = {
            "topk2_swiglu": MoEConfig(num_experts=16, expert_type="swiglu", router={"kind": "topk", "top_k": 2}),
            "stablemoe_stacked": MoEConfig(num_experts=8, expert_type="stacked", sublayers=2, router={"kind": "stablemoe"}),
        }  # fmt: skip
        return {name: self._host_syncs_of(cfg) for name, cfg in cases.items()}

    def _host_syncs_of(self, cfg) -> dict:
        from moetrain.moe.layer import MoELayer

        cuda = torch.cuda.is_available() and not self.smoke
        device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
        T, D = (4096, 512) if cuda else (64, 32)
        kernels = "triton" if cuda else "torch"
        torch.manual_seed(0)
        layer = MoELayer(cfg.model_copy(update={"kernels": kernels}), D, 2 * D, vocab_size=256).to(device, dtype)
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
        ids = torch.randint(0, 256, (T,), device=device)

        def fwd_bwd() -> None:
            out = layer(x, ids)
            (out.y_TD.float().square().mean() + out.aux_loss).backward()

        fwd_bwd()  # warm-up: compile the kernels, allocate
        count, calibration, how = cuda_syncs(fwd_bwd, x) if cuda else counter_syncs(fwd_bwd, x)
        if calibration < 1:
            raise RuntimeError(f"{how} did not see a deliberate host sync: it is not checking anything")
        if count:
            raise RuntimeError(f"{count} host syncs in the MoE layer's forward + backward ({how})")
        return {"host_syncs": count, "calibration_syncs": calibration, "checked_by": how,
                "experts_loop": layer.experts.uses_loop}  # fmt: skip

    def nccl_resume(self, steps: int = 6) -> dict:
        """6 steps (3 + 3 resumed) per precision: what is checked is the exact resume, not the training."""
        out = {}
        for precision in ("fp32", "bf16"):
            full = self._torchrun_once(f"nccl_{precision}_full", precision, steps)
            self._torchrun_once(f"nccl_{precision}_split", precision, steps, [f"train.stop_at_step={steps // 2}"])
            split = self._torchrun_once(f"nccl_{precision}_split", precision, steps, keep=True)
            if split != full or len(full) != steps:
                raise RuntimeError(f"{precision}: resumed losses {split} differ from the uninterrupted run's {full}")
            out[precision] = {"losses": len(full), "final_loss": full[max(full)]}
        out["backend"] = "nccl" if torch.cuda.is_available() and not self.smoke else "gloo"
        return out

    def _torchrun_once(self, name: str, precision: str, steps: int, extra=(), keep: bool = False) -> dict[int, float]:
        run_dir = self.out / "runs" / name
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"train.steps={steps}", f"train.precision={precision}", f"run_dir={run_dir}",
                     f"data.cache_dir={self.cache}", f"checkpoint.interval={max(1, steps // 2)}",
                     "logging.interval=1", "logging.progress=off", *extra]  # fmt: skip
        if self.smoke:
            overrides += SMOKE_MODEL
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        cmd += ["-m", "moetrain.cli", "train", "configs/gpu_swiglu_top2.yaml", *overrides]
        self.run(cmd, env={"MOETRAIN_FORCE_COLLECTIVES": "1"})
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    def uninitialised_rows(self) -> dict:
        """In process (no start-up cost): each mode's MoE layer in bf16, a few SGD steps with the Triton and
        the torch kernels from the same weights, under torch.use_deterministic_algorithms(True), which fills
        every fresh allocation with NaN: a read of an uninitialised row would make a loss NaN."""
        from moetrain.config.model import MoEConfig

        cases = {
            "capacity": {"capacity_factor": 1.0, "router": {"kind": "topk", "top_k": 2}},
            "null_experts": {"null_experts": 2, "router": {"kind": "topk", "top_k": 2}},
            "expert_choice": {"router": {"kind": "expert_choice", "top_k": 2}},
        }
        out = {}
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            for case, fields in cases.items():
                cfg = MoEConfig(num_experts=8, expert_type="swiglu", **fields)
                losses = {k: self._layer_losses(cfg, k) for k in ("triton", "torch")}
                a, b = losses["triton"], losses["torch"]
                if not all(math.isfinite(v) for v in [*a, *b]):
                    raise RuntimeError(f"{case}: a loss is not finite (an uninitialised row was read): {a} / {b}")
                rel = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))
                if rel > 3e-2:
                    raise RuntimeError(
                        f"{case}: Triton and torch kernels disagree: max relative loss difference {rel:.3g}"
                    )
                out[case] = {"steps": len(a), "max_rel_loss_diff": rel}
        finally:
            torch.use_deterministic_algorithms(was)
        return out

    def _layer_losses(self, cfg, kernels: str, steps: int = 4) -> list[float]:
        from moetrain.moe.layer import MoELayer

        cuda = torch.cuda.is_available() and not self.smoke
        device = "cuda" if cuda else "cpu"
        T, D = (4096, 512) if cuda else (64, 32)
        torch.manual_seed(0)
        layer = MoELayer(cfg.model_copy(update={"kernels": kernels}), D, D, vocab_size=256).to(device, torch.bfloat16)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, D, generator=g).to(device, torch.bfloat16)
        ids = torch.randint(0, 256, (T,), generator=g).to(device)
        target = torch.randn(T, D, generator=g).to(device, torch.bfloat16)
        losses = []
        for _ in range(steps):
            out = layer(x, ids, 16)
            loss = (out.y_TD.float() - target.float()).square().mean() + out.aux_loss
            layer.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in layer.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
            losses.append(loss.item())
        return losses

    def bench(self) -> dict:
        out = self.out / "gpu_tier.json"
        cmd = [sys.executable, "bench/gpu_tier.py", "--out", str(out), *self.bench_args.split()]
        env = {}
        if self.smoke:
            cmd.append("--smoke")
            env["TRITON_INTERPRET"] = "1"
        text = self.run(cmd, env=env, timeout=900)
        return {"json": out.name, "table": text[text.find("|") : text.rfind("|") + 1]}

    def e2e(self) -> dict:
        out = self.out / "e2e_lm_gpu.json"
        cmd = [sys.executable, "bench/e2e_lm.py", "--out", str(out), "--override", f"data.cache_dir={self.cache}"]
        if self.smoke:
            cmd += ["--shapes", "top2-e8-1t", "--precision", "bf16", "--reps", "1", "--steps", "4", "--warmup", "2"]
            cmd += ["--override", *SMOKE_MODEL]
        else:
            cmd += ["--device", "cuda", "--shapes", "top2-e8-gpu", "top2-e32-gpu", "--reps", "1", "--steps", "30"]
            cmd += ["--override", *GPU_E2E_MODEL]
        text = self.run(cmd, timeout=900)
        rows = json.loads(out.read_text())["rows"]
        return {"json": out.name, "ratios": {r["shape"]: round(r["ratio"], 3) for r in rows},
                "table": text[text.find("|") : text.rfind("|") + 1]}  # fmt: skip

    def torchtitan_layer(self) -> dict:
        """bench/peers/torchtitan_layer.py in bf16 (on the GPU; smoke: one tiny CPU shape), with the
        python of torchtitan's own environment (``--torchtitan-python``)."""
        probe = subprocess.run([self.peer_python, "-c", "import torchtitan"], capture_output=True, cwd=REPO)
        if probe.returncode != 0:
            raise StepSkippedError(
                f"torchtitan is not importable by {self.peer_python}; the venv recipe is in "
                "bench/peers/torchtitan_layer.py (then --torchtitan-python VENV/bin/python)"
            )
        out = self.out / "torchtitan_layer.json"
        cmd = [self.peer_python, "bench/peers/torchtitan_layer.py", "--dtypes", "bf16", "--out", str(out)]
        cmd += ["--smoke"] if self.smoke else ["--device", "cuda"]
        text = self.run(cmd, timeout=900)
        rows = json.loads(out.read_text())["rows"]
        return {"json": out.name, "ratios": {r["shape"]["name"]: round(r["torchtitan/moetrain"], 3) for r in rows},
                "table": text[text.find("|") : text.rfind("|") + 1]}  # fmt: skip

    # --- output ---------------------------------------------------------------------------------

    def write(self) -> bool:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.record, indent=1))
        (self.out / "gpu_check.md").write_text(summary_markdown(self.record))
        return all(s["status"] in ("pass", "skipped") for s in self.record["steps"].values())


PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b.* in [\d.]+s")


def pytest_summary(output: str) -> str:
    """pytest's closing summary line ("3 passed, 2 skipped in 1.0s") in its output, wherever it is: a
    plugin may print after it (pytest-benchmark's warning did, and the step read that line instead)."""
    lines = [line.strip("= ") for line in output.splitlines() if PYTEST_SUMMARY.search(line)]
    if not lines:
        raise RuntimeError(f"no selected test ran (no pytest summary line): {output.strip()[-300:]}")
    return lines[-1]


def check_some_passed(pytest_tail: str) -> None:
    """A test step whose selected tests all skipped (or none ran) checked nothing: fail it."""
    if " passed" not in pytest_tail:
        raise RuntimeError(f"no selected test ran (all skipped, or none collected): {pytest_tail}")


def cuda_syncs(fwd_bwd, x) -> tuple[int, int, str]:
    """(host syncs of ``fwd_bwd``, syncs seen in a deliberate ``.item()``) under CUDA's sync debug mode."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        try:
            x.sum().item()
            calibration = 0
        except RuntimeError:
            calibration = 1
        try:
            fwd_bwd()
            count = 0
        except RuntimeError:
            count = 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return count, calibration, "torch.cuda.set_sync_debug_mode('error')"


def counter_syncs(fwd_bwd, x) -> tuple[int, int, str]:
    """The same with the CPU stand-in (tests/host_sync.py's HostSyncCounter)."""
    sys.path.insert(0, str(REPO / "tests"))
    from host_sync import HostSyncCounter  # a test utility, not in the package

    with HostSyncCounter() as calibration:
        x.sum().item()
    with HostSyncCounter() as syncs:
        fwd_bwd()
    return syncs.count, calibration.count, "HostSyncCounter (CPU stand-in)"


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for module in ("triton", "deepspeed"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def summary_markdown(record: dict) -> str:
    env = record["env"]
    lines = [
        f"# moetrain GPU check ({record['mode']})", "",
        f"Device: {env.get('device', 'CPU (no CUDA)')}; torch {env['torch']}, CUDA {env['cuda']}, "
        f"triton {env['triton']}, deepspeed {env['deepspeed']}; {env['date']}.", "",
        "| step | status | seconds | result |", "|---|---|---|---|",
    ]  # fmt: skip
    for name, s in record["steps"].items():
        if s["status"] == "fail":
            result = s["error"].splitlines()[0][:200]
        elif s["status"] == "skipped":
            result = s["reason"]
        elif name.startswith("train_"):
            t, r = s["runs"]["triton"], s["runs"]["torch"]
            result = (f"max rel loss diff {s['max_rel_loss_diff']:.2e} (tol {s['tolerance']}); final val loss "
                      f"{t['final_val_loss']:.4f} / {r['final_val_loss']:.4f}; tokens/s {t['median_tokens_per_s']:.3g} "
                      f"(triton) / {r['median_tokens_per_s']:.3g} (torch); loop-fallback layers "
                      f"{t['grouped_gemm_fallback_layers']}")  # fmt: skip
        elif name == "host_syncs":
            result = "; ".join(
                f"{k}: {v['host_syncs']} syncs, {v['calibration_syncs']} in the deliberate one ({v['checked_by']})"
                for k, v in s.items()
                if isinstance(v, dict)
            )
        elif name == "nccl_resume":
            result = f"{s['backend']}: resumed losses == uninterrupted, fp32 and bf16"
        elif name == "uninitialised_rows":
            result = "; ".join(
                f"{k}: max rel diff {v['max_rel_loss_diff']:.2e}" for k, v in s.items() if isinstance(v, dict)
            )
        elif name == "gpu_tests":
            result = s["summary"]
        elif name == "e2e":
            result = "moetrain / deepspeed tokens/s: " + ", ".join(f"{k} {v}" for k, v in s["ratios"].items())
        elif name == "torchtitan_layer":
            result = "torchtitan / moetrain time, bf16: " + ", ".join(f"{k} {v}" for k, v in s["ratios"].items())
        else:
            result = f"see {s.get('json')}"
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {result} |")
    if "bench" in record["steps"] and record["steps"]["bench"].get("table"):
        lines += ["", "## bench/gpu_tier.py", "", record["steps"]["bench"]["table"]]
    if "e2e" in record["steps"] and record["steps"]["e2e"].get("table"):
        lines += ["", "## bench/e2e_lm.py", "", record["steps"]["e2e"]["table"]]
    if record["steps"].get("torchtitan_layer", {}).get("table"):
        lines += ["", "## bench/peers/torchtitan_layer.py", "", record["steps"]["torchtitan_layer"]["table"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and short, on the CPU (what the test suite runs)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 100; smoke 3)")
    parser.add_argument("--bench-args", default="", help="extra arguments for bench/gpu_tier.py, e.g. '--reps 5'")
    parser.add_argument(
        "--torchtitan-python",
        default=os.environ.get("MOETRAIN_PEER_TORCHTITAN_PYTHON", sys.executable),
        help="the python of torchtitan's environment (default: $MOETRAIN_PEER_TORCHTITAN_PYTHON, else this one); "
        "the torchtitan_layer step is skipped when it cannot import torchtitan",
    )
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --smoke for the CPU plumbing check", file=sys.stderr)
        return 2
    check = Check(args)
    t0 = time.perf_counter()
    check.step("gpu_tests", check.gpu_tests)
    for name in TRAIN_RUNS:
        check.step(f"train_{name}", lambda name=name: check.train(name))
    check.step("host_syncs", check.host_syncs)
    check.step("bench", check.bench)
    check.step("e2e", check.e2e)
    check.step("nccl_resume", check.nccl_resume)
    check.step("uninitialised_rows", check.uninitialised_rows)
    check.step("torchtitan_layer", check.torchtitan_layer)
    check.record["total_seconds"] = round(time.perf_counter() - t0, 1)
    ok = check.write()
    print(
        f"[gpu_check] {'ok' if ok else 'FAILED'} in {check.record['total_seconds']} s; wrote {check.out}/gpu_check.md"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
