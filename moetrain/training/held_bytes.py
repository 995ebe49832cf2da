"""ZeRO-3: the parameter bytes each rank holds, measured on its partitions, and the report of them.

The trainer prints them once, after this run's first optimizer step: between steps stage 3 holds every
parameter's partition plus a whole copy of those it keeps gathered for good (``ds_persist``, see
``stage3_param_persistence_threshold``), which it gathers at the first forward. ``tests/test_zero3.py``
checks the numbers against the single-process model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moetrain.moe.experts import is_expert_param
from moetrain.parallel.collectives import gather_objects
from moetrain.training.callbacks import Callback, StepResult
from moetrain.training.zero3 import is_partitioned

if TYPE_CHECKING:
    from moetrain.training.trainer import Trainer


def held_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameter data this rank holds now, ``{"dense": ..., "experts": ...}``: of a ZeRO-3
    parameter its partition plus whatever whole copy stage 3 keeps (none outside a forward unless the
    parameter is persistent), of any other parameter the tensor itself. Counted, not estimated."""
    out = {"dense": 0, "experts": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights are held once
            continue
        seen.add(id(p))
        held = p.numel() * p.element_size()
        if is_partitioned(p):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
        out["experts" if is_expert_param(name) else "dense"] += held
    return out


def whole_parameter_bytes(model: nn.Module, ep_size: int) -> dict[str, int]:
    """The same split for the whole model (every global expert), in the model's dtype, from the shapes."""
    out = {"dense": 0, "experts": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        numel = p.ds_numel if is_partitioned(p) else p.numel()
        size = (p.ds_tensor if is_partitioned(p) else p).element_size()
        if is_expert_param(name):
            out["experts"] += numel * size * ep_size
        else:
            out["dense"] += numel * size
    return out


class HeldBytesReport(Callback):
    """After this run's first optimizer step, rank 0 prints every rank's held bytes beside the whole
    model's: ``ZeRO-3: parameter bytes held per rank: dense [...] of D, experts [...] of X``. Collective."""

    def __init__(self) -> None:
        self.done = False

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if self.done:
            return
        self.done = True
        held = gather_objects(held_parameter_bytes(trainer.model))
        whole = whole_parameter_bytes(trainer.model, trainer.layout.ep_size)
        if held is not None:
            parts = [f"{k} {[h[k] for h in held]} of {whole[k]}" for k in ("dense", "experts")]
            trainer._say(f"ZeRO-3: parameter bytes held per rank: {', '.join(parts)}")
