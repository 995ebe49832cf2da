"""Side-by-side comparison of the MoE designs at equal active FLOPs (docs/routers.md, "Comparison").

Trains Switch (top-1), StableMoE, aux-loss-free top-1, DeepSeekMoE-style (1 shared + top-3 of 32
fine-grained experts, aux-loss-free), expert-choice and null-expert models, plus the dense backbone,
on the same data, steps and seeds, with the harness of ``bench/reproduce_stablemoe.py`` (its regime:
the CPU paper configs, BPE tokens, warmup, StableMoE's adaptive stage 1). Every MoE layer has the
active width of one expert of 3 x 512 stacked sublayers: GELU experts of width 1536 (8 experts, top-1),
or 4 x 384 (fine-grained). The table replaces the part of docs/routers.md between its comparison
markers (or goes to ``--out``).

    python bench/compare_routers.py --jobs 2                         # 7 models x 3 seeds, 600 steps
    python bench/compare_routers.py --steps 30 --seeds 0 --models switch auxfree --out /tmp/c.md   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_stablemoe as rs  # noqa: E402  (the shared harness: train, summarize, mean_std)

GELU = ["moe.expert_type=gelu", "moe.expert_hidden=1536", "moe.expert_init=default"]
rs.MODELS.update(
    {
        "cmp_switch": ("lm_switch.yaml", "Switch (top-1)", GELU),
        "cmp_stablemoe": ("lm_stablemoe.yaml", "StableMoE", GELU),
        "cmp_auxfree": (
            "lm_switch.yaml",
            "aux-loss-free top-1 (sigmoid)",
            [*GELU, "moe.router={kind: topk, top_k: 1, score_func: sigmoid, bias_update_rate: 0.001, "
             "load_balance_coeff: 0}"],
        ),
        "cmp_deepseek": (
            "lm_switch.yaml",
            "shared + fine-grained (1 + top-3 of 32), aux-loss-free",
            ["moe.expert_type=gelu", "moe.expert_init=default", "moe.num_experts=32", "moe.expert_hidden=384",
             "moe.shared_experts=1", "moe.router={kind: topk, top_k: 3, score_func: sigmoid, renormalize: true, "
             "bias_update_rate: 0.001, load_balance_coeff: 0, seq_aux_coeff: 0.0001}"],
        ),
        "cmp_expert_choice": (
            "lm_switch.yaml",
            "expert choice (k = 1, capacity 1.0; not causal)",
            [*GELU, "moe.router={kind: expert_choice, top_k: 1, capacity_factor: 1.0}"],
        ),
        "cmp_null": (
            "lm_switch.yaml",
            "null experts (8 real + 8 null, top-2)",
            [*GELU, "moe.null_experts=8", "moe.router.top_k=2"],
        ),
        "cmp_dense": ("lm_dense.yaml", "dense backbone", []),
    }
)  # fmt: skip
NAMES = {m.removeprefix("cmp_"): m for m in rs.MODELS if m.startswith("cmp_")}
BEGIN, END = "<!-- comparison: written by bench/compare_routers.py -->", "<!-- /comparison -->"


def table(results: dict[str, list[dict]]) -> list[str]:
    rows = [
        "| model | val PPL | tokens/s | load max/mean¹ | dropped | fluctuation after 10 / 50 %² | active experts³ |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, runs in results.items():
        dense = model == "cmp_dense"
        fl = " / ".join(rs.mean_std([r.get("fluct", {}).get(k) for r in runs], ".1f", 100, "%") for k in ("0.1", "0.5"))
        rows.append(
            f"| {rs.MODELS[model][1]} | {rs.mean_std([r['val_ppl'] for r in runs])} | "
            f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f} | "
            f"{'–' if dense else rs.mean_std([r['load_after'] for r in runs])} | "
            f"{'–' if dense else rs.mean_std([r['dropped'] for r in runs], '.1f', 100, '%')} | "
            f"{'–' if dense else fl} | {rs.mean_std([r.get('active') for r in runs])} |"
        )
    return rows


def active_experts(run_dir: Path) -> float | None:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r[k] for r in recs for k in ("moe/layer0/active_experts", "moe/layer0/experts_per_token") if k in r]
    return statistics.mean(vals) if vals else None


def page(results: dict[str, list[dict]], args: argparse.Namespace, command: str, elapsed: float) -> str:
    import torch

    steps = next(iter(results.values()))[0]["steps"]
    lines = [
        BEGIN,
        "",
        f"```bash\n{command}\n```",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores, {args.jobs} run(s) at a time "
        f"with one thread each, torch {torch.__version__}; seeds {args.seeds}, {steps} steps each; "
        + (
            f"assembled from the finished runs in {args.runs_dir} (first start to last end: {elapsed / 60:.1f} min)."
            if args.summarize_only
            else f"whole run {elapsed / 60:.1f} min (load average at the start {args.load_at_start:.1f})."
        )
        + " Mean ± std over the seeds.",
        "",
        *table(results),
        "",
        "¹ Mean `load_max_over_mean` after the first 10 % of the steps (StableMoE: after its switch). "
        "² Fraction of held-out probe tokens whose last expert change came after 10 / 50 % of training "
        "(expert choice: the token's best chosen expert). ³ Real experts per token (null experts: "
        "`active_experts`; expert choice: `experts_per_token`); top-k models use exactly k.",
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def finished_runs(jobs: list[tuple[str, int]], runs_dir: Path) -> tuple[list[dict], float]:
    """The summaries of the jobs whose run finished (its fluctuation probe written), and the time from
    the first run's start to the last one's end (file times)."""
    done, starts, ends = [], [], []
    for model, seed in jobs:
        run_dir = runs_dir / f"{model}_seed{seed}"
        if not (run_dir / "fluctuation.json").is_file() and model != "cmp_dense":
            continue
        if not (run_dir / "metrics.jsonl").is_file() or "val_ppl" not in (run_dir / "metrics.jsonl").read_text():
            continue
        start, end = (run_dir / "train.log").stat().st_ctime, (run_dir / "metrics.jsonl").stat().st_mtime
        starts.append(start)
        ends.append(end)
        done.append(rs.summarize(model, seed, run_dir, end - start))
    if not done:
        sys.exit(f"no finished runs in {runs_dir}")
    return done, max(ends) - min(starts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(NAMES), choices=list(NAMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one intra-op thread each")
    p.add_argument("--runs-dir", type=Path, default=rs.REPO / "runs" / "compare_routers")
    p.add_argument("--out", type=Path, default=rs.REPO / "docs" / "routers.md", help="a page with the markers, or new")
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: build the table from the finished runs in --runs-dir (e.g. after an interrupted sweep)",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. data.cache_dir=...)")
    args = p.parse_args()
    if args.jobs < 1 or args.steps < 10:
        p.error(f"--jobs ({args.jobs}) must be >= 1 and --steps ({args.steps}) >= 10")
    command = ("python bench/compare_routers.py " + shlex.join(sys.argv[1:])).strip()
    args.load_at_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    jobs = [(NAMES[m], s) for s in args.seeds for m in args.models]
    if args.summarize_only:
        done, elapsed = finished_runs(jobs, args.runs_dir)
        t0 = time.perf_counter() - elapsed
    else:
        rs.prepare(args.overrides)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(rs.train, m, s, args.steps, args.runs_dir, args.overrides) for m, s in jobs]
            try:
                done = [f.result() for f in futures]
            except RuntimeError as exc:
                sys.exit(str(exc))
    results: dict[str, list[dict]] = {}
    for r in done:
        r["active"] = active_experts(args.runs_dir / f"{r['model']}_seed{r['seed']}")
        results.setdefault(r["model"], []).append(r)
    (args.runs_dir / "results.json").write_text(json.dumps(results, indent=1))
    block = page(results, args, command, time.perf_counter() - t0)
    old = args.out.read_text() if args.out.is_file() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) + 1 :]
    else:
        new = old + ("\n" if old else "") + block
    args.out.write_text(new)
    print(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
