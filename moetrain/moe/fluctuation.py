"""Routing fluctuation (StableMoE paper section 4.4.4, Fig. 2 and 7): do tokens keep changing expert?

Shape suffixes: the legend in ``moetrain/moe/__init__.py``; here P probes, L MoE layers, T probe tokens.

:class:`FluctuationProbe` (a hook the MoE layers declare when ``moe.fluctuation.interval`` is set)
re-routes a fixed held-out token set -- the first ``blocks`` validation blocks -- every ``interval``
optimizer steps (and at step 0 and the last step), for every MoE layer, with the model in evaluation
mode: it records the routing the model would use at inference (StableMoE: ``eval_routing`` in stage 1,
the frozen distilled router in stage 2; BASE: greedy argmax, as the paper's code evaluates; Switch:
argmax; Hash: the table). It logs ``moe/layer{i}/fluctuation``, the fraction of probe tokens whose
expert changed since the previous probe, to ``metrics.jsonl``, and at the end of a run writes the
paper's last-fluctuation-step distribution (:func:`fluctuation_report`) to ``fluctuation.json``.

Each probe is one file ``fluctuation/step_NNNNNN.npy`` (int16 [L, T]) written by rank 0. A resumed run
deletes the probes after its checkpoint's step, so its record equals an uninterrupted run's.

With ``L_t = max{k : a_t^(k) != a_t^(final)}`` (0 for a token that never left its final expert), the
paper's last-fluctuation-step distribution is the fraction of tokens with ``L_t > f * train.steps`` for
f in 10/20/50/80 %. The paper reports 40.9 / 29.1 / 15.4 % for BASE at 20 / 50 / 80 %; StableMoE
cannot fluctuate after its switch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from moetrain.config.model import FluctuationConfig
from moetrain.moe.hooks import HookContext, StepReport, TrainingHooks

if TYPE_CHECKING:
    from moetrain.moe.layer import MoELayer

PROBE_FILE = re.compile(r"^step_(\d+)\.npy$")

THRESHOLDS = (0.1, 0.2, 0.5, 0.8)


def last_change_steps(steps: Sequence[int], ids_PT: np.ndarray) -> np.ndarray:
    """L_t: the last probe step at which token t's expert differs from its final one (0 if never)."""
    differs_PT = ids_PT != ids_PT[-1]
    steps_P = np.asarray(steps, dtype=np.int64)
    return np.where(differs_PT, steps_P[:, None], 0).max(axis=0)


def fluctuation_report(steps: Sequence[int], ids_PLT: np.ndarray, total_steps: int) -> dict:
    """The content of ``fluctuation.json`` for probes ``ids_PLT`` taken at ``steps``."""
    layers = []
    for i in range(ids_PLT.shape[1]):
        ids_PT = ids_PLT[:, i]
        last_T = last_change_steps(steps, ids_PT)
        layers.append(
            {
                "layer": i,
                "last_change_after": {f"{f:g}": float((last_T > f * total_steps).mean()) for f in THRESHOLDS},
                "changed_since_previous": [float(x) for x in (ids_PT[1:] != ids_PT[:-1]).mean(axis=1)],
            }
        )
    return {
        "definition": "last_change_after[f] = fraction of probe tokens whose last expert change "
        "(L_t = max{k: a_t^(k) != a_t^(final)}) happened after f * total_steps",
        "total_steps": total_steps,
        "probe_steps": list(steps),
        "tokens": int(ids_PLT.shape[2]),
        "layers": layers,
    }


class FluctuationProbe(TrainingHooks):
    """Re-routes a fixed held-out token set every ``interval`` steps; see the module docstring."""

    order = 1  # observes the routing after this step's state changes (StableMoE's switch)

    def __init__(self, layers: list[MoELayer], cfg: FluctuationConfig) -> None:
        self.layers = layers
        self.cfg = cfg
        self.prev: np.ndarray | None = None
        self.last_probe = -1

    def on_train_start(self, ctx: HookContext) -> None:
        self.folder = Path(ctx.run_dir) / "fluctuation"
        self.tokens_NS = ctx.heldout_blocks(self.cfg.blocks)
        step = ctx.step
        if ctx.is_writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            for s, path in self._records():
                if s > step:  # probes of a run that went on past the checkpoint we resumed from
                    path.unlink()
            kept = self._records()
            if kept:
                self.last_probe = kept[-1][0]
                self.prev = np.load(kept[-1][1])
        if step == 0 and self.last_probe != 0:
            self.probe(ctx, 0)

    def after_step(self, ctx: HookContext, report: StepReport) -> None:
        if report.step % self.cfg.interval == 0:
            self.probe(ctx, report.step)

    def on_train_end(self, ctx: HookContext) -> None:
        step = ctx.step
        if self.last_probe != step:
            self.probe(ctx, step)
        if ctx.is_writer:
            records = self._records()
            ids_PLT = np.stack([np.load(p) for _, p in records])
            report = fluctuation_report([s for s, _ in records], ids_PLT, ctx.total_steps)
            (Path(ctx.run_dir) / "fluctuation.json").write_text(json.dumps(report, indent=1))

    def probe(self, ctx: HookContext, step: int) -> None:
        """Route the probe set (every rank: expert parallelism needs all of them in the forward)."""
        ids_LT = self.route(ctx)
        self.last_probe = step
        if not ctx.is_writer:
            return
        tmp = self.folder / f".step_{step:06d}.npy"
        np.save(tmp, ids_LT)
        os.replace(tmp, self.folder / f"step_{step:06d}.npy")
        if self.prev is not None:
            changed = (ids_LT != self.prev).mean(axis=1)
            ctx.log(step, {f"moe/layer{i}/fluctuation": float(c) for i, c in enumerate(changed)})
        self.prev = ids_LT

    @torch.no_grad()
    def route(self, ctx: HookContext) -> np.ndarray:
        """Expert id (top-1 slot) of every probe token in every MoE layer, int16 [L, T]."""
        captured: list[list[torch.Tensor]] = [[] for _ in self.layers]
        hooks = [
            layer.router.register_forward_hook(
                lambda _m, _i, out, i=i: captured[i].append(out.expert_ids_TK[:, 0].cpu())
            )
            for i, layer in enumerate(self.layers)
        ]
        try:
            ctx.forward_eval(self.tokens_NS)
        finally:
            for h in hooks:
                h.remove()
        return np.stack([torch.cat(c).numpy() for c in captured]).astype(np.int16)

    def _records(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := PROBE_FILE.match(p.name))]
        return sorted(found)
