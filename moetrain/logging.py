"""Run logging: console summary + progress bar (rank 0), ``metrics.jsonl``, and wandb.

Non-zero ranks get a :class:`NullLogger`, so the loop never asks ``if rank == 0``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from moetrain.config.training import LoggingConfig


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4g}"
    return f"{v:.2e}"


class RunLogger:
    """Rank 0's logger. ``log(step, metrics)`` writes one JSON line and, for train/eval, a console line."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, total_steps: int, start_step: int, config: dict) -> None:
        self.cfg = cfg
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.total = total_steps
        show_bar = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        self.wandb = None
        if cfg.wandb.enabled:
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
            self.wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                tags=cfg.wandb.tags,
                config=config,
                dir=str(run_dir),
                name=run_dir.name,
                mode=cfg.wandb.mode,
            )

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if "loss" in metrics:
            parts = [f"step {step}/{self.total}", f"loss {_fmt(metrics['loss'])}"]
            for key, label in (("aux_loss", "aux"), ("lr", "lr"), ("grad_norm", "grad"), ("tokens_per_s", "tok/s")):
                if (
                    key in metrics
                    and metrics[key] is not None
                    and not (isinstance(metrics[key], float) and math.isnan(metrics[key]))
                ):
                    parts.append(f"{label} {_fmt(metrics[key])}")
            self.write(" | ".join(parts))
        if "val_loss" in metrics:
            self.write(
                f"step {step}/{self.total} | val_loss {_fmt(metrics['val_loss'])} | val_ppl {_fmt(metrics['val_ppl'])}"
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What every rank but 0 gets."""

    def write(self, text: str) -> None: ...

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...
