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


def drop_records_after(path: Path, step: int) -> int:
    """Keep only the records of ``path`` that a run starting at ``step`` will not write again.

    A run resuming from step s > 0 logs steps s+1.. again, which the run it resumes may have logged
    before it stopped; a run starting fresh (s = 0) logs everything again, its step-0 evaluation too.
    A line cut short by a kill goes as well. The file is rewritten atomically. Returns lines dropped.
    """
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    steps = [_step_of(line) for line in lines]
    kept = [line for line, s in zip(lines, steps) if step > 0 and s is not None and s <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class RunLogger:
    """Rank 0's logger. ``log(step, metrics)`` writes one JSON line and, for train/eval, a console line."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, total_steps: int, start_step: int, config: dict) -> None:
        self.cfg = cfg
        path = run_dir / "metrics.jsonl"
        dropped = drop_records_after(path, start_step)
        self.file = open(path, "a", encoding="utf-8")
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
        if dropped:
            self.write(f"{path}: dropped {dropped} records after step {start_step} (this run logs those steps again)")

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
