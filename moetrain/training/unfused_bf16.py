"""DeepSpeed's bf16 optimizer at ZeRO-0 (``FP16_UnfusedOptimizer``), as moetrain runs it.

For bf16 at stage 0 DeepSpeed 0.19.8 wraps the client AdamW in ``FP16_UnfusedOptimizer``: the model holds
bf16 weights, the wrapper an fp32 master copy of each, which AdamW updates. Two things are changed here, on
the instance DeepSpeed built; its state dict, and so the checkpoint format, stay DeepSpeed's:

- :func:`undo_unfused_init_step`: the extra Adam step DeepSpeed takes while building it;
- :func:`use_grouped_step`: its ``step`` visits the parameters one at a time four times over (an
  overflow check reducing each gradient, a norm of each bf16 gradient, an fp32 cast of each, a multiply of
  each by the unscale factor even when that factor is 1), then AdamW, then a copy back per weight; and
  under expert parallelism its clipping norm leaves the experts out. ``GroupedStepBf16``
  (:func:`grouped_step_class`) makes the same update with grouped (``torch._foreach_*``) ops: the casts,
  one norm pass over the fp32 gradients, which is also the overflow check (a gradient holding an inf or a
  NaN has a non-finite norm) and counts every expert once under expert parallelism, a multiply only when
  the gradients are clipped, one grouped copy back. Measured in docs/benchmarks.md ("bf16 at ZeRO-0:
  DeepSpeed's optimizer step in grouped ops").
"""

from __future__ import annotations

import functools
import math

import torch

from moetrain.parallel.grad_norm import global_norm


def _unfused_class():
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return FP16_UnfusedOptimizer


def undo_unfused_init_step(optimizer) -> None:
    """DeepSpeed 0.19.8's ``FP16_UnfusedOptimizer`` (bf16 at ZeRO-0) steps the client optimizer once with
    zero gradients while it is built (``initialize_optimizer_states``): Adam's step count then starts at 1,
    so the first real update is Adam's second-step bias correction (0.74 lr instead of lr, and every later
    update off by one step), and weight decay has already been applied once at the initial lr. Undone here:
    each fp32 master is copied again from its bf16 weight (which that step did not touch) and its Adam state
    dropped, so the first real step starts it as torch's AdamW does (tests/test_deepspeed_contract.py)."""
    if not isinstance(optimizer, _unfused_class()):
        return
    inner = optimizer.optimizer
    for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        for lp, hp in zip(lps, hps):
            hp.data.copy_(lp.data)
            inner.state.pop(hp, None)


def grouped_step_applies(optimizer, world_size: int, backward_allreduce: bool, ep_group=None) -> bool:
    """Whether :func:`use_grouped_step` may replace this wrapper's step: a plain ``FP16_UnfusedOptimizer``
    (not its legacy fused-LAMB mode) whose gradients are reduced before the step (one process, or
    DeepSpeed's gradient all-reduce on, which reduces expert gradients over their expert-data-parallel
    group), no model-parallel unit, and, where parameters are tagged as experts (expert parallelism), the
    expert-parallel group to sum their norms over. Then every rank computes the same norm and makes the
    same skip decision, with no vote. Elsewhere DeepSpeed's step stays."""
    return (
        type(optimizer) is _unfused_class()
        and not optimizer.fused_lamb_legacy
        and optimizer.mpu is None
        and (ep_group is not None or not optimizer.overflow_checker.has_moe_params)
        and (world_size == 1 or backward_allreduce)
    )


def use_grouped_step(optimizer, world_size: int, backward_allreduce: bool, ep_group=None) -> bool:
    """Give DeepSpeed's wrapper ``GroupedStepBf16``'s ``step`` where :func:`grouped_step_applies`, with
    ``ep_group`` (the expert-parallel group; None without expert parallelism). Returns whether it did."""
    if not grouped_step_applies(optimizer, world_size, backward_allreduce, ep_group):
        return False
    from deepspeed.moe.utils import is_moe_param

    optimizer.__class__ = grouped_step_class()
    optimizer.ep_group = ep_group
    optimizer.expert_flags = [is_moe_param(lp) for lps in optimizer.fp16_groups for lp in lps]
    return True


def wrapper_name(optimizer) -> str:
    """The name of DeepSpeed's optimizer wrapper for the log, saying where moetrain's grouped step runs it."""
    if type(optimizer).__name__ == "GroupedStepBf16":
        return "FP16_UnfusedOptimizer (moetrain's grouped step)"
    return type(optimizer).__name__


@functools.cache
def grouped_step_class() -> type:
    """:class:`GroupedStepBf16`, built on first use: it subclasses a DeepSpeed class, and importing this
    module does not import deepspeed."""
    unfused = _unfused_class()

    class GroupedStepBf16(unfused):
        """``FP16_UnfusedOptimizer`` whose ``step`` uses grouped ops (module docstring). The update is
        DeepSpeed's: the same fp32 gradients, the same clipping factor up to the rounding of the norm's
        sum, the same skip of a step whose gradients are not finite (tests/test_unfused_bf16.py); under
        expert parallelism the norm counts every expert once, where DeepSpeed's leaves the experts out."""

        def step(self, closure=None):
            pairs = [(hp, lp) for hps, lps in zip(self.fp32_groups, self.fp16_groups) for hp, lp in zip(hps, lps)]
            for hp, lp in pairs:
                hp.grad = torch.zeros_like(hp) if lp.grad is None else lp.grad.to(hp.dtype)
            masters = [hp for hp, _ in pairs]
            norm = grad_norm([hp.grad for hp in masters], self.expert_flags, self.ep_group)
            self.overflow = not math.isfinite(norm)
            if self.overflow:
                for hp in masters:
                    hp.grad = None
                return self._skip_invalid_grad_norm()
            self._global_grad_norm = norm
            self._update_scale(False)
            scale = self.unscale_and_clip_grads(norm, apply_scale=False)
            if scale != 1.0:
                torch._foreach_mul_([hp.grad for hp in masters], 1.0 / scale)
            self.optimizer.step()
            for hp in masters:
                hp.grad = None
            torch._foreach_copy_([lp.data for _, lp in pairs], [hp.data for hp in masters])
            return self.overflow

    return GroupedStepBf16


def grad_norm(grads: list[torch.Tensor], expert_flags: list[bool] | None = None, ep_group=None) -> float:
    """The 2-norm of all ``grads`` together, counting every expert once under expert parallelism: each
    gradient's norm as DeepSpeed takes it (of the gradient cast to fp32, which is exact), squares summed
    in fp64, those flagged in ``expert_flags`` (this rank's experts) also over ``ep_group``
    (``moetrain/parallel/grad_norm.py``'s ``global_norm``). inf or NaN if any gradient on any rank of the
    group holds one. One host sync; collective over ``ep_group``."""
    flags = expert_flags or [False] * len(grads)
    shared = [g for g, expert in zip(grads, flags) if not expert]
    expert = [g for g, expert in zip(grads, flags) if expert]
    device = grads[0].device if grads else torch.device("cpu")
    return float(global_norm(shared, expert, ep_group, device, accumulate=torch.float64))
