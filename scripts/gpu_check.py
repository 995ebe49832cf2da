"""The one prepared GPU check: everything moetrain claims about a CUDA GPU, checked in one run.

    bash scripts/gpu_check.sh                  # on a machine with one CUDA GPU (H100/H200: ~10 min, estimated)
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
6. ``torchtitan_layer``: ``bench/peers/torchtitan_layer.py --device cuda`` (moetrain's MoE layer
   against torchtitan's on copied weights, bf16, forward + backward) with the python of torchtitan's
   own environment (``--torchtitan-python``); smoke: one tiny CPU shape. Recorded as skipped, not
   failed, when that python cannot import torchtitan.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``; exits 1 if any step failed (a skipped
step is not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from moetrain.parallel.layout import LAUNCHER_VARS

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
        self.steps = args.steps or (3 if self.smoke else 300)
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
        full_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2500:]}"
            )
        return proc.stdout + proc.stderr

    # --- the steps ------------------------------------------------------------------------------

    def gpu_tests(self) -> dict:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        cmd += ["tests/test_host_sync.py"] if self.smoke else ["tests"]
        tail = self.run(cmd, timeout=900).strip().splitlines()[-1]
        if not self.smoke and "skipped" in tail and "passed" not in tail:
            raise RuntimeError(f"every gpu test was skipped: {tail}")
        return {"summary": tail}

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
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fwd_bwd()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return {
                "host_syncs": 0,
                "checked_by": "torch.cuda.set_sync_debug_mode('error')",
                "experts_loop": layer.experts.uses_loop,
            }
        from moetrain.kernels.host_sync import HostSyncCounter

        with HostSyncCounter() as syncs:
            fwd_bwd()
        if syncs.count:
            raise RuntimeError(syncs.report())
        return {
            "host_syncs": 0,
            "checked_by": "HostSyncCounter (CPU stand-in)",
            "experts_loop": layer.experts.uses_loop,
        }

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
            cmd += ["--device", "cuda", "--shapes", "top2-e8-gpu", "top2-e32-gpu", "--reps", "2", "--steps", "40"]
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
                f"{k}: {v['host_syncs']} syncs ({v['checked_by']})" for k, v in s.items() if isinstance(v, dict)
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
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; smoke 3)")
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
    check.step("torchtitan_layer", check.torchtitan_layer)
    check.record["total_seconds"] = round(time.perf_counter() - t0, 1)
    ok = check.write()
    print(
        f"[gpu_check] {'ok' if ok else 'FAILED'} in {check.record['total_seconds']} s; wrote {check.out}/gpu_check.md"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
