"""Small-scale reproduction of the StableMoE paper's LM comparison (Table 2 + routing fluctuation).

Trains the CPU-scaled Switch, BASE, Hash and StableMoE models (configs/paper/cpu/) -- identical data,
steps, seed, initial backbone and experts, and active FLOPs -- plus StableMoE without a capacity
limit and the dense baseline, one after the other, and writes docs/stablemoe_reproduction.md:
validation loss / perplexity, routing fluctuation after the switch point (10 % of the steps),
tokens/s, next to the paper's Table 2, with the command that produced it.

    python bench/reproduce_stablemoe.py                 # ~15 minutes on 2 CPU cores
    python bench/reproduce_stablemoe.py --steps 100 --out /tmp/check.md     # a quick smoke run
    python bench/reproduce_stablemoe.py --seeds 0 1 2   # mean +- std over seeds (3x the time)
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "paper" / "cpu"
MODELS = {  # name -> (config, label, extra overrides)
    "switch": ("lm_switch.yaml", "Switch Transformer", []),
    "base": ("lm_base.yaml", "BASE Layer", []),
    "hash": ("lm_hash.yaml", "Hash Layer", []),
    "stablemoe": ("lm_stablemoe.yaml", "StableMoE (capacity factor 2, as the code)", []),
    "stablemoe_dropless": ("lm_stablemoe.yaml", "StableMoE, dropless", ["moe.capacity_factor=null"]),
    "dense": ("lm_dense.yaml", "Standard Transformer (dense)", []),
}
MOE = ("switch", "base", "hash", "stablemoe", "stablemoe_dropless")
PAPER_PPL = {"dense": 23.02, "switch": 19.79, "base": 20.04, "hash": 19.63, "stablemoe": 19.28}  # Table 2, base
PAPER_BASE_FLUCT = {"0.2": 0.409, "0.5": 0.291, "0.8": 0.154}  # section 4.4.4, BASE layer
SWITCH_AT = "0.1"  # StableMoE's stage 1 = 10 % of the steps: the "switch point" for every model


def train(model: str, seed: int, steps: int | None, runs_dir: Path, extra: list[str]) -> dict:
    config, _, model_overrides = MODELS[model]
    run_dir = runs_dir / f"{model}_seed{seed}"
    cmd = [sys.executable, "-m", "moetrain.cli", "train", str(CONFIGS / config), f"run_dir={run_dir}"]
    cmd += [f"seed={seed}", "checkpoint.resume=none", *model_overrides, *extra]
    if steps is not None:
        cmd.append(f"train.steps={steps}")
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {model} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{model} failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    return summarize(model, run_dir, wall)


def summarize(model: str, run_dir: Path, wall: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r][-1]
    out = {
        "model": model,
        "steps": train_recs[-1]["step"],
        "val_loss": val["val_loss"],
        "val_ppl": val["val_ppl"],
        "train_loss": train_recs[-1]["loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_recs),  # robust to eval intervals
        "wall_s": wall,
    }
    moe_recs = [r for r in train_recs if "moe/layer0/load_max_over_mean" in r]
    if moe_recs:
        out["load_max_over_mean"] = statistics.mean(r["moe/layer0/load_max_over_mean"] for r in moe_recs)
        out["dropped_frac"] = statistics.mean(r["moe/layer0/dropped_frac"] for r in moe_recs)
    fluct_path = run_dir / "fluctuation.json"
    if fluct_path.is_file():
        report = json.loads(fluct_path.read_text())
        layer = report["layers"][0]
        switch_step = float(SWITCH_AT) * report["total_steps"]
        after = [c for s, c in zip(report["probe_steps"][1:], layer["changed_since_previous"]) if s > switch_step]
        out["last_change_after"] = layer["last_change_after"]
        out["mean_change_per_probe_after_switch"] = sum(after) / max(len(after), 1)
    return out


def active_params(model: str) -> int:
    """Parameters one token uses: everything but the experts it does not visit (router included)."""
    from moetrain.config import load_config
    from moetrain.model import MoETransformer

    cfg = load_config(CONFIGS / MODELS[model][0], MODELS[model][2])
    net = MoETransformer(cfg.model.model_copy(update={"vocab_size": 257}), cfg.moe)
    total = sum(p.numel() for p in net.parameters())
    if cfg.moe is None:
        return total
    experts = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n)
    return total - experts + experts // cfg.moe.num_experts


def mean_std(values: list[float], fmt: str = ".3f", unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}{unit}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}{unit}"


def mean(runs: list[dict], key: str, sub: str | None = None) -> float | None:
    if key not in runs[0]:
        return None
    return statistics.mean(r[key][sub] if sub else r[key] for r in runs)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table_rows(results: dict[str, list[dict]]) -> list[str]:
    rows = []
    for model, runs in results.items():
        la = "last_change_after" in runs[0]
        switch = mean_std([100 * r["last_change_after"][SWITCH_AT] for r in runs], ".1f", "%") if la else "–"
        later = " / ".join(pct(mean(runs, "last_change_after", k)) for k in ("0.2", "0.5", "0.8")) if la else "–"
        probe = mean_std([100 * r["mean_change_per_probe_after_switch"] for r in runs], ".1f", "%") if la else "–"
        load = mean(runs, "load_max_over_mean")
        rows.append(
            f"| {MODELS[model][1]} | {mean_std([r['val_loss'] for r in runs])} | "
            f"{mean_std([r['val_ppl'] for r in runs])} | {switch} | {later} | {probe} | "
            f"{'–' if load is None else f'{load:.2f}'} | {pct(mean(runs, 'dropped_frac'))} | "
            f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f} | {active_params(model) / 1e6:.3f}M |"
        )
    return rows


def write_report(results: dict[str, list[dict]], args: argparse.Namespace, command: str, elapsed: float) -> str:
    import deepspeed
    import torch

    steps = next(iter(results.values()))[0]["steps"]
    cpu = platform.processor() or platform.machine()
    return (
        "\n".join(
            [
                "# StableMoE: small-scale reproduction of the paper's LM comparison",
                "",
                "Written by `bench/reproduce_stablemoe.py`; rerun it to refresh this page:",
                "",
                f"```bash\n{command}\n```",
                "",
                f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores ({cpu}), torch "
                f"{torch.__version__}, deepspeed {deepspeed.__version__}; seed(s) {args.seeds}, {steps} steps each, "
                f"whole run {elapsed / 60:.1f} min.",
                "",
                "Setup (`configs/paper/cpu/`): byte-level LM on the built-in corpus (Python standard library "
                "sources), 4 blocks, d = 128, sequences of 128 bytes, 16 per step; one MoE layer inserted after "
                "block 2 of 4 with 8 experts of 3 stacked residual FFN sublayers (d_ff 512); alpha = 0.3; "
                "StableMoE stage 1 = 10 % of the steps; Adam (0.9, 0.98), linear decay, clip 0.1. The MoE models "
                "share data order, seed, initial backbone and expert weights, and active FLOPs (top-1); they "
                "differ only in the router (and the capacity factor, set per method as in the official code).",
                "",
                "| model | val loss | val PPL (bytes) | fluctuation after the switch point¹ | last change > 20 / 50 / 80 %² "
                "| mean per-probe change after 10 %³ | max / mean expert load⁴ | tokens dropped⁴ | tokens/s⁵ "
                "| active params / token⁶ |",
                "|---|---|---|---|---|---|---|---|---|---|",
                *table_rows(results),
                "",
                "¹ Fraction of the held-out probe tokens (32 validation blocks, 4,096 tokens) whose last expert change "
                "(L_t = max{k : a_t^(k) ≠ a_t^(final)}, probes every 20 steps, evaluation routing) happened after 10 % "
                "of training, StableMoE's switch point. ² The same after 20 / 50 / 80 % (the paper, BASE: 40.9 / 29.1 "
                "/ 15.4 %). ³ Mean over the probes after 10 % of the fraction of tokens whose expert changed since the "
                "previous probe (`moe/layer0/fluctuation`). ⁴ Training averages of `moe/layer0/load_max_over_mean` and "
                "`moe/layer0/dropped_frac` (tokens over an expert's capacity pass through the layer unchanged). "
                "⁵ Median over log intervals of training tokens/s on this machine (2 cores shared with other jobs: "
                "noisy; BASE pays for its balanced assignment on the host). ⁶ Parameters a token uses, router "
                "included (StableMoE's includes its 257 x 50 distilled embedding, a lookup).",
                "",
                "## The paper (Table 2, LM base, 60K steps on ~100B tokens, 32 experts, GPT-2 BPE)",
                "",
                "| model | valid PPL | routing fluctuation |",
                "|---|---|---|",
                "| Standard Transformer | 23.02 | – |",
                "| Switch Transformer | 19.79 | not reported |",
                "| BASE Layer | 20.04 | 40.9 / 29.1 / 15.4 % of tokens last change after 20 / 50 / 80 % |",
                "| Hash Layer | 19.63 | none (fixed table) |",
                "| StableMoE | **19.28** | none after the switch at 10 % |",
                "",
                "## What agrees and what does not",
                "",
                *observations(results),
            ]
        )
        + "\n"
    )


def observations(results: dict[str, list[dict]]) -> list[str]:
    ppl = {m: statistics.mean(r["val_ppl"] for r in runs) for m, runs in results.items()}
    name = {m: MODELS[m][1] for m in MODELS}
    moe = [m for m in MOE if m in ppl]
    paper_moe = [m for m in moe if m in PAPER_PPL]
    ours, paper = sorted(paper_moe, key=ppl.get), sorted(paper_moe, key=PAPER_PPL.get)
    out = [
        f"- Validation perplexity, best first, here: {' < '.join(name[m] for m in ours)}; the paper: "
        f"{' < '.join(name[m] for m in paper)}." + (" Same order." if ours == paper else " **The order differs.**")
    ]
    if "dense" in ppl:
        diffs = ", ".join(f"{name[m]} {ppl[m] - ppl['dense']:+.3f}" for m in moe)
        paper_gap = PAPER_PPL["stablemoe"] - PAPER_PPL["dense"]
        out.append(f"- Perplexity minus the dense model's: {diffs} (the paper: {paper_gap:+.2f} for StableMoE).")
    for m in moe:
        runs = results[m]
        after, dropped = mean(runs, "last_change_after", SWITCH_AT), mean(runs, "dropped_frac")
        if after is None:
            continue
        if m.startswith("stablemoe"):
            verdict = "exactly zero, as the paper states" if after == 0 else "NOT zero: check the run"
            out.append(
                f"- {name[m]}: {pct(after)} of the probe tokens changed expert after the switch ({verdict}); "
                f"{pct(dropped)} of the training tokens were over capacity, max / mean expert load "
                f"{mean(runs, 'load_max_over_mean'):.2f}."
            )
        elif m == "base":
            la = [pct(mean(runs, "last_change_after", k)) for k in ("0.2", "0.5", "0.8")]
            out.append(
                f"- BASE keeps fluctuating: {' / '.join(la)} of the tokens last changed expert after 20 / 50 / "
                "80 % of training (the paper: 40.9 / 29.1 / 15.4 %)."
            )
        elif m == "switch":
            out.append(f"- Switch: {pct(after)} of the tokens last changed expert after 10 % of training.")
        elif m == "hash":
            out.append(
                f"- Hash: {pct(after)} fluctuation (a fixed table), max / mean load "
                f"{mean(runs, 'load_max_over_mean'):.2f}, dropless."
            )
    steps = next(iter(results.values()))[0]["steps"]
    out.append(
        f"- Scale caveat: {steps}-step byte-level models with 8 experts on a few million tokens, three to four "
        "orders of magnitude below the paper. Byte ids are few (257) and very unevenly used (spaces and "
        "indentation dominate Python source), so any router that is a function of the token id alone -- "
        "Hash, and StableMoE's frozen distilled router -- cannot balance the load; with the code's "
        "capacity factor 2 StableMoE then drops the overflow. Differences of a few tenths of a percent "
        "are within seed-to-seed noise unless `--seeds` shows otherwise."
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=None, help="override train.steps (default: the configs' 600)")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "reproduce_stablemoe")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "stablemoe_reproduction.md")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. data.cache_dir=...)")
    args = p.parse_args()
    command = ("python bench/reproduce_stablemoe.py " + shlex.join(sys.argv[1:])).strip()
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for model in args.models:
            results.setdefault(model, []).append(train(model, seed, args.steps, args.runs_dir, args.overrides))
    elapsed = time.perf_counter() - t0
    (args.runs_dir / "results.json").write_text(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(write_report(results, args, command, elapsed))
    print(f"wrote {args.out} and {args.runs_dir / 'results.json'} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
