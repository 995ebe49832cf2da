"""Small-scale reproduction of the StableMoE paper's LM comparison (Table 2, Fig. 4, routing fluctuation).

Trains StableMoE, Switch (top-1), BASE, Hash and the dense backbone (configs/paper/cpu/) on BPE tokens
from moetrain's trained tokenizer (``data.tokenizer: {train: bpe, vocab_size: 4096}``), every model on
the same data, steps and seeds; the MoE models also share the initial backbone and experts and the
active FLOPs (top-1, one expert stack of 3 sublayers per token). The regime has the paper's shape:
a warmup of 10 % of the steps, a stage 1 that lasts until the distilled router has learned the routing
(``switch: adaptive``, at most 50 % of the steps: the longest stage 1 of the paper's Table 6), the official backbone and expert initialisation
(``embed_scale: sqrt_d``, ``expert_init: fairseq``). It writes a markdown page (default
docs/stablemoe_reproduction.md) with mean ± std over the seeds for every row.

    python bench/reproduce_stablemoe.py --jobs 2                  # the full run: 3 seeds, ~45 min on 2 idle cores
    python bench/reproduce_stablemoe.py --steps 200 --seeds 0 --out /tmp/x.md   # a smoke run (minutes)
    python bench/reproduce_stablemoe.py --corpus /data/my_text    # any local text corpus (files / folders / globs)

Each run is its own ``moetrain train`` process with one intra-op thread (``--jobs N`` runs N at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "paper" / "cpu"
MODELS = {  # name -> (config, label, extra overrides)
    "stablemoe": ("lm_stablemoe.yaml", "StableMoE", []),
    "switch": ("lm_switch.yaml", "Switch Transformer (top-1)", []),
    "base": ("lm_base.yaml", "BASE Layer", []),
    "hash": ("lm_hash.yaml", "Hash Layer", []),
    "dense": ("lm_dense.yaml", "Standard Transformer (dense)", []),
    "stablemoe_dropless": ("lm_stablemoe.yaml", "StableMoE, dropless", ["moe.capacity_factor=null"]),
}
DEFAULT_MODELS = ["stablemoe", "switch", "base", "hash", "dense"]
PAPER_PPL = {"dense": 23.02, "switch": 19.79, "base": 20.04, "hash": 19.63, "stablemoe": 19.28}  # Table 2, base
FLUCT_AT = ("0.1", "0.2", "0.5", "0.8")  # routing fluctuation after 10 / 20 / 50 / 80 % of training
# The regime as fractions of train.steps, so that --steps keeps its shape (the configs hold the same
# numbers for their 600 steps).
WARMUP, STAGE1_MAX, EVALS, PROBES, WINDOW = 0.10, 0.50, 20, 35, 0.05


def regime_overrides(model: str, steps: int) -> list[str]:
    out = [
        f"train.steps={steps}",
        f"optim.warmup_steps={max(1, round(WARMUP * steps))}",
        f"train.eval_interval={max(1, steps // EVALS)}",
    ]
    config = MODELS[model][0]  # by the config, so that other harnesses (bench/compare_routers.py) can add models
    if config != "lm_dense.yaml":
        out.append(f"moe.fluctuation.interval={max(1, steps // PROBES)}")
    if config == "lm_stablemoe.yaml":
        out += [
            f"moe.router.stage1_steps={max(1, round(STAGE1_MAX * steps))}",
            f"moe.router.adaptive.window={max(2, round(WINDOW * steps))}",
        ]
    return out


def train(model: str, seed: int, steps: int, runs_dir: Path, extra: list[str]) -> dict:
    config, _, model_overrides = MODELS[model]
    run_dir = runs_dir / f"{model}_seed{seed}"
    cmd = [sys.executable, "-m", "moetrain.cli", "train", str(CONFIGS / config), f"run_dir={run_dir}"]
    cmd += [f"seed={seed}", "checkpoint.resume=none", *regime_overrides(model, steps), *model_overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one intra-op thread per run
    env.setdefault("DS_ACCELERATOR", "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] start {model} seed {seed}", flush=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{model} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    print(f"[{time.strftime('%H:%M:%S')}] done  {model} seed {seed} in {wall / 60:.1f} min", flush=True)
    return summarize(model, seed, run_dir, wall)


def prepare(extra: list[str]) -> None:
    """Train the BPE and tokenize the corpus once, before parallel runs would race for it."""
    cmd = [sys.executable, "-m", "moetrain.cli", "prepare", str(CONFIGS / MODELS["dense"][0]), *extra]
    print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def _mean(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if key in r]
    return statistics.mean(vals) if vals else None


def summarize(model: str, seed: int, run_dir: Path, wall: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    val = [(r["step"], r["val_ppl"]) for r in records if "val_ppl" in r]
    steps = train_recs[-1]["step"]
    switch = next((r for r in records if "moe/switch_step" in r), None)
    split = switch["moe/switch_step"] if switch else round(0.1 * steps)  # "before / after the switch"
    before = [r for r in train_recs if r["step"] <= split]
    after = [r for r in train_recs if r["step"] > split]
    last_quarter = [r for r in train_recs if r["step"] > 0.75 * steps]
    p = "moe/layer0/"
    out = {
        "model": model,
        "seed": seed,
        "steps": steps,
        "val_ppl": val[-1][1],
        "val_curve": val,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_recs),
        "wall_s": wall,
        "load_before": _mean(before, p + "load_max_over_mean"),
        "load_after": _mean(after, p + "load_max_over_mean"),
        "dropped": _mean(train_recs, p + "dropped_frac"),
        "gate_mean": _mean(last_quarter, p + "gate_mean"),
        "gate_low": _mean(last_quarter, p + "gate_low_frac"),
    }
    if switch:
        out.update(
            {
                "switch_step": switch["moe/switch_step"],
                "switch_reason": switch["moe/switch_reason"],
                "switch_agreement": switch.get(p + "switch_distill_acc"),
                "switch_distill": switch.get(p + "switch_distill"),
                "switch_distilled_load": switch.get(p + "switch_distilled_load_max_over_mean"),
            }
        )
    fluct_path = run_dir / "fluctuation.json"
    if fluct_path.is_file():
        out["fluct"] = json.loads(fluct_path.read_text())["layers"][0]["last_change_after"]
    return out


def step_reaching(curve: list[list[float]], target: float) -> float | None:
    """First evaluated step whose validation PPL is <= target (None: never)."""
    return next((s for s, ppl in curve if ppl <= target), None)


def mean_std(values: list[float | None], fmt: str = ".2f", scale: float = 1.0, unit: str = "") -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    missing = f" ({len(values) - len(vals)} of {len(values)} never)" if len(vals) < len(values) else ""
    if len(vals) == 1:
        return f"{vals[0]:{fmt}}{unit}{missing}"
    return f"{statistics.mean(vals):{fmt}} ± {statistics.stdev(vals):{fmt}}{unit}{missing}"


def table(results: dict[str, list[dict]]) -> list[str]:
    dense_target = statistics.mean(r["val_ppl"] for r in results["dense"]) if "dense" in results else None
    head = (
        "| model | val PPL | step reaching the dense final PPL¹ | fluctuation after 10 / 20 / 50 / 80 %² "
        "| mean gate³ | gates < 0.1³ | load max/mean before / after the switch⁴ | tokens dropped | tokens/s |"
    )
    rows = [head, "|---|---|---|---|---|---|---|---|---|"]
    for model, runs in results.items():
        reach = "–"
        if dense_target is not None and model != "dense":
            reach = mean_std([step_reaching(r["val_curve"], dense_target) for r in runs], ".0f")
        fl = " / ".join(mean_std([r.get("fluct", {}).get(k) for r in runs], ".1f", 100, "%") for k in FLUCT_AT)
        load = f"{mean_std([r['load_before'] for r in runs])} / {mean_std([r['load_after'] for r in runs])}"
        rows.append(
            f"| {MODELS[model][1]} | {mean_std([r['val_ppl'] for r in runs])} | {reach} | "
            f"{fl if model != 'dense' else '–'} | {mean_std([r['gate_mean'] for r in runs], '.3f')} | "
            f"{mean_std([r['gate_low'] for r in runs], '.1f', 100, '%')} | {load if model != 'dense' else '–'} | "
            f"{mean_std([r['dropped'] for r in runs], '.1f', 100, '%')} | "
            f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f} |"
        )
    return rows


def switch_rows(results: dict[str, list[dict]]) -> list[str]:
    reasons = {1: "stage1_steps", 2: "criteria met", 3: "max steps (criteria not met)"}
    rows = [
        "| model | seed | switch step | reason | agreement at the switch | distillation loss at the switch "
        "| distilled router's load max/mean at the switch |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, runs in results.items():
        for r in runs:
            if "switch_step" in r:
                rows.append(
                    f"| {MODELS[model][1]} | {r['seed']} | {r['switch_step']} | {reasons.get(r['switch_reason'], '?')} "
                    f"| {100 * r['switch_agreement']:.1f}% | {r['switch_distill']:.3f} | "
                    f"{r['switch_distilled_load']:.2f} |"
                )
    return rows if len(rows) > 2 else []


def write_report(results: dict[str, list[dict]], args: argparse.Namespace, command: str, elapsed: float) -> str:
    import deepspeed
    import torch

    steps = next(iter(results.values()))[0]["steps"]
    cpu = platform.processor() or platform.machine()
    corpus = args.corpus or "the built-in corpus (Python standard library sources)"
    ppl = {m: statistics.mean(r["val_ppl"] for r in runs) for m, runs in results.items()}
    order = sorted((m for m in ppl if m != "dense"), key=ppl.get)
    lines = [
        "# StableMoE: small-scale reproduction of the paper's LM comparison",
        "",
        "Written by `bench/reproduce_stablemoe.py`; rerun it to refresh this page:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores ({cpu}), {args.jobs} run(s) at "
        f"a time with one thread each, torch {torch.__version__}, deepspeed {deepspeed.__version__}; seeds "
        f"{args.seeds}, {steps} steps each; whole run {elapsed / 60:.1f} min (load average at the start "
        f"{args.load_at_start:.1f}: other processes slow every run).",
        "",
        f"Setup (`configs/paper/cpu/`, overrides in the command): {corpus}, byte-level BPE of 4,096 tokens trained "
        "by moetrain; 4 blocks, d = 128, sequences of 128 tokens, 16 per step; one MoE layer after block 2 of 4 "
        "with 8 experts of 3 stacked residual FFN sublayers (d_ff 512, the official init); token embeddings "
        "scaled by sqrt(d) (init std d^-0.5); Adam (0.9, 0.98), lr 3e-3, warmup 10 % of the steps then linear "
        "decay, clip 0.1; alpha = 0.3; StableMoE's stage 1 ends when its distilled router agrees with the "
        "backbone on 80 % of the tokens with a max/mean load <= 2 over 5 % of the steps, at 50 % at the latest. "
        "Every number is mean ± std over the seeds.",
        "",
        *table(results),
        "",
        "¹ First evaluation step (every 5 % of training) at which the model's validation PPL is at or below the "
        "dense model's final validation PPL (mean over seeds): the convergence speed of the paper's Fig. 4 in "
        "steps (the same FLOPs per step for every MoE model). ² Fraction of the held-out probe tokens whose last "
        "expert change (L_t = max{k : a_t^(k) ≠ a_t^(final)}) came after 10 / 20 / 50 / 80 % of training "
        "(the paper, BASE: 40.9 / 29.1 / 15.4 % after 20 / 50 / 80 %). ³ Mean over the last quarter of training of "
        "`gate_mean` / `gate_low_frac` (Hash: gate 1). ⁴ Mean of `load_max_over_mean` over the training steps before "
        "/ after StableMoE's switch step (other models: 10 % of the steps).",
        "",
        "## The stage switch (StableMoE)",
        "",
        *(switch_rows(results) or ["No StableMoE run."]),
        "",
        "## The paper (Table 2, LM base, 60K steps, 32 experts, GPT-2 BPE)",
        "",
        "| model | valid PPL |",
        "|---|---|",
        *(f"| {MODELS[m][1]} | {PAPER_PPL[m]} |" for m in ("dense", "switch", "base", "hash", "stablemoe")),
        "",
        "## Order",
        "",
        f"- Validation PPL, best first, here: {' < '.join(MODELS[m][1] for m in order)}; the paper: "
        + " < ".join(MODELS[m][1] for m in sorted((m for m in PAPER_PPL if m in order), key=PAPER_PPL.get))
        + ".",
        f"- Scale caveat: {steps} steps of a 4-block d = 128 model with 8 experts, orders of magnitude below the "
        "paper; differences smaller than the ± column are noise.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="train.steps of every run (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one intra-op thread each")
    p.add_argument("--corpus", default=None, help="a local text corpus (file, folder or glob) instead of the built-in")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "reproduce_stablemoe")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "stablemoe_reproduction.md")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. data.cache_dir=...)")
    args = p.parse_args()
    if args.jobs < 1 or args.steps < 10:
        p.error(f"--jobs ({args.jobs}) must be >= 1 and --steps ({args.steps}) >= 10")
    if args.corpus is not None and not Path(args.corpus).exists() and not any(c in args.corpus for c in "*?["):
        p.error(f"--corpus {args.corpus!r} does not exist; give a text file, a folder or a glob")
    extra = ([f"data.paths=[{json.dumps(str(Path(args.corpus).resolve()))}]"] if args.corpus else []) + args.overrides
    command = ("python bench/reproduce_stablemoe.py " + shlex.join(sys.argv[1:])).strip()
    args.load_at_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    prepare(extra)
    jobs = [(m, s) for s in args.seeds for m in args.models]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train, m, s, args.steps, args.runs_dir, extra) for m, s in jobs]
        try:
            done = [f.result() for f in futures]
        except RuntimeError as exc:
            sys.exit(str(exc))
    elapsed = time.perf_counter() - t0
    results: dict[str, list[dict]] = {}
    for r in done:
        results.setdefault(r["model"], []).append(r)
    (args.runs_dir / "results.json").write_text(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(write_report(results, args, command, elapsed))
    print(f"wrote {args.out} and {args.runs_dir / 'results.json'} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
