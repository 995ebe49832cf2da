"""``moetrain report RUN_DIR``: PNG plots of a run from its metrics.jsonl (matplotlib, Agg).

- loss.png:          train loss and validation loss against step
- expert_load.png:   per MoE layer, a step x expert heatmap of the share of tokens each expert got
- fluctuation.png:   routing fluctuation per MoE layer (when the probe ran)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from moetrain.errors import UserError

LOAD_KEY = re.compile(r"^moe/layer(\d+)/load$")
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

    fluct = _series(records, FLUCT_KEY)
    if fluct:
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer, series in sorted(fluct.items()):
            ax.plot(*zip(*series), "o-", label=f"layer {layer}")
        ax.set(xlabel="step", ylabel="fraction of probe tokens that changed expert", title="routing fluctuation")
        ax.legend()
        written.append(_save(fig, run_dir / "fluctuation.png"))
    return written


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
