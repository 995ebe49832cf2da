"""The routing-fluctuation probe, a training callback (the maths: :mod:`moetrain.moe.fluctuation`).

A probe re-routes a fixed held-out token set -- the first ``blocks`` validation blocks -- every
``interval`` optimizer steps (and at step 0 and the last step), for every MoE layer, with the model in
evaluation mode: it records the routing the model would use at inference (StableMoE: ``eval_routing``
in stage 1, the frozen distilled router in stage 2; BASE: greedy argmax, as the paper's code
evaluates; Switch: argmax; Hash: the table). It logs ``moe/layer{i}/fluctuation``, the fraction of
probe tokens whose expert changed since the previous probe, to ``metrics.jsonl``, and at the end of
a run writes the paper's last-fluctuation-step distribution to ``fluctuation.json``.

Each probe is one file ``fluctuation/step_NNNNNN.npy`` (int16 [L, T]) written by rank 0. A resumed
run deletes the probes after its checkpoint's step, so its record equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from moetrain.config.model import FluctuationConfig
from moetrain.moe.fluctuation import fluctuation_report
from moetrain.training.callbacks import Callback, StepResult

if TYPE_CHECKING:
    from moetrain.training.trainer import Trainer

PROBE_FILE = re.compile(r"^step_(\d+)\.npy$")


class FluctuationProbe(Callback):
    """Re-routes a fixed held-out token set every ``interval`` steps; see the module docstring."""

    def __init__(self, cfg: FluctuationConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.prev: np.ndarray | None = None
        self.last_probe = -1

    def on_train_start(self, trainer: "Trainer") -> None:
        self.folder = Path(trainer.run_dir) / "fluctuation"
        self.is_writer = trainer.layout.rank == 0
        blocks = trainer.val_blocks
        self.tokens_NS = blocks.get([i % blocks.num_blocks for i in range(self.cfg.blocks)])[0]
        step = trainer.state.step
        if self.is_writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            for s, path in self._records():
                if s > step:  # probes of a run that went on past the checkpoint we resumed from
                    path.unlink()
            kept = self._records()
            if kept:
                self.last_probe = kept[-1][0]
                self.prev = np.load(kept[-1][1])
        if step == 0 and self.last_probe != 0:
            self.probe(trainer, 0)

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if result.step % self.cfg.interval == 0:
            self.probe(trainer, result.step)

    def on_train_end(self, trainer: "Trainer") -> None:
        step = trainer.state.step
        if self.last_probe != step:
            self.probe(trainer, step)
        if self.is_writer:
            records = self._records()
            ids_PLT = np.stack([np.load(p) for _, p in records])
            report = fluctuation_report([s for s, _ in records], ids_PLT, self.total_steps)
            (Path(trainer.run_dir) / "fluctuation.json").write_text(json.dumps(report, indent=1))

    # --- helpers -------------------------------------------------------------------------------------

    def probe(self, trainer: "Trainer", step: int) -> None:
        """Route the probe set (every rank: expert parallelism needs all of them in the forward)."""
        ids_LT = self.route(trainer)
        self.last_probe = step
        if not self.is_writer:
            return
        tmp = self.folder / f".step_{step:06d}.npy"
        np.save(tmp, ids_LT)
        os.replace(tmp, self.folder / f"step_{step:06d}.npy")
        if self.prev is not None:
            changed = (ids_LT != self.prev).mean(axis=1)
            trainer.logger.log(step, {f"moe/layer{i}/fluctuation": float(c) for i, c in enumerate(changed)})
        self.prev = ids_LT

    @torch.no_grad()
    def route(self, trainer: "Trainer") -> np.ndarray:
        """Expert id (top-1 slot) of every probe token in every MoE layer, int16 [L, T]."""
        engine = trainer.engine
        captured: list[list[torch.Tensor]] = [[] for _ in trainer.model.moe_layers()]
        hooks = [
            layer.router.register_forward_hook(
                lambda _m, _i, out, i=i: captured[i].append(out.expert_ids_TK[:, 0].cpu())
            )
            for i, layer in enumerate(trainer.model.moe_layers())
        ]
        was_training = trainer.model.training
        engine.eval()
        try:
            for chunk in self.tokens_NS.split(trainer.cfg.train.micro_batch_size):
                engine(chunk.to(engine.device))
        finally:
            for h in hooks:
                h.remove()
            engine.train(was_training)
        return np.stack([torch.cat(c).numpy() for c in captured]).astype(np.int16)

    def _records(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := PROBE_FILE.match(p.name))]
        return sorted(found)
