"""``moetrain report RUN_DIR [RUN_DIR ...]``: PNG plots of runs from their metrics.jsonl (matplotlib, Agg).

Per run, in its directory:

- loss.png:          train loss and validation loss against step
- expert_load.png:   per MoE layer, a step x expert heatmap of the share of tokens each expert got
- routing.png:       per MoE layer, the gate statistics (mean gate, fraction of gates < 0.1), expert
                     load max/mean and, for StableMoE, the distillation loss and the distilled router's
                     agreement with the backbone; a dashed line marks the stage switch
- fluctuation.png:   routing fluctuation per MoE layer (when the probe ran)

With two or more runs, also one PNG (``--out``) overlaying their validation-loss curves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from moetrain.errors import UserError

LOAD_KEY = re.compile(r"^moe/layer(\d+)/load$")
ROUTING_PANELS = [  # (metric of moe/layer{i}/..., y label)
    ("gate_mean", "mean gate"),
    ("gate_low_frac", "fraction of gates < 0.1"),
    ("load_max_over_mean", "load max / mean"),
    ("distill_acc", "agreement of the distilled\nrouter with the backbone"),
    ("distill", "distillation loss"),
    ("distilled_load_max_over_mean", "distilled router's\nload max / mean"),
]
FLUCT_KEY = re.compile(r"^moe/layer(\d+)/fluctuation$")


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"report: {str(run_dir)!r} has no metrics.jsonl; give a run directory of moetrain train")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise UserError(f"report: {path}:{n} is not valid JSON") from None
    return records


def make_report(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_records(run_dir)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: loss")
    ax.legend()
    written.append(_save(fig, run_dir / "loss.png"))

    loads = _series(records, LOAD_KEY)
    if loads:
        fig, axes = plt.subplots(len(loads), 1, figsize=(7, 2.5 * len(loads)), squeeze=False)
        for ax, (layer, series) in zip(axes[:, 0], sorted(loads.items())):
            steps = [s for s, _ in series]
            share = np.array([v for _, v in series], dtype=float)
            share = share / share.sum(axis=1, keepdims=True).clip(min=1e-9)
            im = ax.imshow(
                share.T,
                aspect="auto",
                cmap="viridis",
                origin="lower",
                extent=(steps[0], steps[-1], -0.5, share.shape[1] - 0.5),
            )
            ax.set(xlabel="step", ylabel="expert", title=f"MoE layer {layer}: share of tokens per expert")
            fig.colorbar(im, ax=ax)
        written.append(_save(fig, run_dir / "expert_load.png"))

    routing = _routing_figure(plt, records, run_dir)
    if routing is not None:
        written.append(_save(routing, run_dir / "routing.png"))

    fluct = _series(records, FLUCT_KEY)
    if fluct:
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer, series in sorted(fluct.items()):
            ax.plot(*zip(*series), "o-", label=f"layer {layer}")
        ax.set(xlabel="step", ylabel="fraction of probe tokens that changed expert", title="routing fluctuation")
        ax.legend()
        written.append(_save(fig, run_dir / "fluctuation.png"))
    return written


def make_overlay(run_dirs: list[Path], out: Path) -> Path:
    """One PNG with the validation-loss curve of every run (labelled by its directory name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(run_dirs) < 2:
        raise UserError("report --out: the overlay needs two or more run directories")
    labels = _labels(run_dirs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir, label in zip(run_dirs, labels):
        val = [(r["step"], r["val_loss"]) for r in read_records(run_dir) if "val_loss" in r]
        if not val:
            raise UserError(f"report: {run_dir} has no validation loss in its metrics.jsonl (train.eval_interval)")
        ax.plot(*zip(*val), "o-", markersize=3, label=label)
    ax.set(xlabel="step", ylabel="validation loss", title="validation loss")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Directory names; parent/name where names repeat."""
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.resolve().parent.name}/{d.resolve().name}" for d in run_dirs]


def _routing_figure(plt, records: list[dict], run_dir: Path):
    """Per-layer routing diagnostics (ROUTING_PANELS) against step; None when no layer logged any."""
    panels = [
        (name, label, _series(records, re.compile(rf"^moe/layer(\d+)/{name}$"))) for name, label in ROUTING_PANELS
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    switch = [r["moe/switch_step"] for r in records if "moe/switch_step" in r]
    if switch:  # the routing losses are 0 by definition in stage 2: not a curve worth drawing
        stage1 = {"distill", "distilled_load_max_over_mean"}
        panels = [
            (n, lab, {i: [(s, v) for s, v in ser if n not in stage1 or s <= switch[-1]] for i, ser in by.items()})
            for n, lab, by in panels
        ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False, sharex=True)
    for ax, (_name, label, by_layer) in zip(axes[:, 0], panels):
        for layer, series in sorted(by_layer.items()):
            if series:
                ax.plot(*zip(*series), label=f"layer {layer}")
        for step in switch:
            ax.axvline(step, color="grey", linestyle="--", linewidth=1)
        ax.set(ylabel=label)
        if len(by_layer) > 1:
            ax.legend(fontsize="small")
    axes[-1, 0].set(xlabel="step")
    axes[0, 0].set(title=f"{run_dir.name}: routing" + (f" (stage switch at step {switch[-1]})" if switch else ""))
    return fig


def _series(records: list[dict], key: re.Pattern) -> dict[int, list[tuple[int, object]]]:
    """{MoE layer: [(step, value), ...]} for the metric names ``key`` matches (layer = group 1)."""
    out: dict[int, list[tuple[int, object]]] = {}
    for r in records:
        for name, value in r.items():
            m = key.match(name)
            if m:
                out.setdefault(int(m.group(1)), []).append((r["step"], value))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
