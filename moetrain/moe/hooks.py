"""What the MoE side needs done between optimizer steps, declared by the modules that need it.

The design's rule: routing state changes only between optimizer steps, from the trainer, never with
an ``if step >= ...`` inside ``forward``. The trainer does not know which router needs what: a module
class declares its hooks, and the trainer calls every declared hook at fixed points of the loop
(torchtitan's model-registered optimizer hooks, generalised to the whole step):

- a module class (a router, the MoE layer) defines a classmethod
  ``declare_hooks(cls, modules: list[Self]) -> list[TrainingHooks]``; :func:`collect_hooks` calls it
  once per class with all of that class's instances in the model, so a hook may act on every layer at
  once (StableMoE's switch freezes every layer in the same step, with one collective);
- a module may tag parameters that need an optimizer group of their own (``optimizer_group_tags()``:
  ``{tag: [params]}``) so that a hook can later freeze that group (:meth:`HookContext.freeze_group`)
  without the optimizer knowing what the parameters are.

The trainer implements :class:`HookContext`; nothing here imports the training side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from moetrain.moe.metrics import LayerStats


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, as the hooks see it after the update."""

    step: int  # optimizer steps done (1-based: the step just taken)
    moe_stats: list[list[LayerStats]]  # per micro-batch, per MoE layer
    skipped: bool = False  # the update was dropped (train.nonfinite: skip); its statistics are not finite


class HookContext(Protocol):
    """What the trainer offers hooks; the trainer's adapter implements it."""

    @property
    def step(self) -> int:
        """Optimizer steps done so far (the step a resumed run starts from, at ``on_train_start``)."""

    @property
    def total_steps(self) -> int:
        """``train.steps``: the length of the whole run (schedules are fractions of it)."""

    @property
    def run_dir(self) -> Path: ...

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes shared files (rank 0)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics in ``metrics.jsonl`` (and the console/wandb as configured)."""

    def say(self, text: str) -> None:
        """One line on the console and in the run's log."""

    def freeze_group(self, tag: str) -> int:
        """Learning rate and weight decay 0 for the optimizer groups of parameters tagged ``tag`` (and
        the LR schedule keeps them at 0): AdamW's update of them is then exactly nothing, under every
        ZeRO stage. Returns the number of groups changed."""

    def training_tokens(self) -> list[np.ndarray]:
        """The training token arrays, one per data source (memory-mapped)."""

    def heldout_blocks(self, count: int) -> torch.Tensor:
        """The first ``count`` validation blocks of the first source, ``[count, seq_len]`` (repeated
        when there are fewer): a fixed token set for probes."""

    def forward_eval(self, tokens_NS: torch.Tensor) -> None:
        """Run the model on ``tokens_NS`` in evaluation mode without gradients (every rank must call it
        together under expert parallelism); hooks observe the routing with forward hooks."""


class TrainingHooks:
    """Between-steps work one module class declares. Every method is optional (no-op here).

    ``order``: hooks run in ascending order at each point (stable for ties); the default 0 is for hooks
    that change routing state, observers that must see the new state use a larger value.
    """

    order: int = 0

    def on_train_start(self, ctx: HookContext) -> None:
        """Before the first step of this run (fresh or resumed), after the checkpoint is loaded."""

    def before_step(self, ctx: HookContext, step: int) -> None:
        """Before the first forward of optimizer step ``step`` (0-based): a gradient-accumulation boundary."""

    def after_step(self, ctx: HookContext, report: StepReport) -> None:
        """After the optimizer update of ``report.step``."""

    def on_train_end(self, ctx: HookContext) -> None:
        """After the last step, before the final checkpoint."""


def collect_hooks(model: nn.Module) -> list[TrainingHooks]:
    """Every hook the modules of ``model`` declare, in run order.

    Classes are visited in the order their first instance appears in ``model.modules()``; each class's
    ``declare_hooks`` gets all its instances (a class without the method declares nothing)."""
    by_class: dict[type, list[nn.Module]] = {}
    for module in model.modules():
        if callable(getattr(type(module), "declare_hooks", None)):
            by_class.setdefault(type(module), []).append(module)
    hooks = [hook for cls, modules in by_class.items() for hook in cls.declare_hooks(modules)]
    return sorted(hooks, key=lambda h: h.order)


def optimizer_group_tags(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> tag`` for every parameter a module tags for a group of its own."""
    tags: dict[int, str] = {}
    for module in model.modules():
        declare = getattr(module, "optimizer_group_tags", None)
        if callable(declare):
            for tag, params in declare().items():
                tags.update({id(p): tag for p in params})
    return tags
