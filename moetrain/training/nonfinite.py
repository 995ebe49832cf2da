"""``train.nonfinite``: what a non-finite loss or gradient norm does, decided before the optimizer step.

Every step, before ``engine.step()`` applies the update, every rank's loss (and the gradient norm,
where moetrain computes it: ZeRO-0 in fp32) is checked and the verdict is all-reduced, so all ranks
act alike -- one small all-reduce and one host sync per step. Then:

- ``stop`` (default): raise before the update; the weights and the last checkpoint stay intact.
- ``skip``: drop the update (no weight or Adam-state change, the LR schedule does not advance, the
  batch is consumed), count it in ``skipped_steps``, and stop after ``nonfinite_max_skips`` in a row.

Under ZeRO-1/2 and bf16 DeepSpeed computes the gradient norm inside its step and itself skips an
update whose norm is not finite; moetrain reads that verdict afterwards (``engine.was_step_applied``)
and applies the same policy.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.parallel.collectives import any_rank


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm under ``train.nonfinite: stop`` (exit code 1)."""


class NonFiniteGuard:
    def __init__(self, policy: str, max_skips: int) -> None:
        self.policy = policy
        self.max_skips = max_skips
        self.consecutive = 0
        self.skipped = 0

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """True if the update of ``step`` must be skipped (raises under ``stop``). Collective."""
        ok = torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            ok = ok & torch.isfinite(grad_norm.detach().float())
        if not any_rank(~ok):
            return False
        what = f"loss {loss.item():.4g}" + (f", gradient norm {grad_norm.item():.4g}" if grad_norm is not None else "")
        self._count(step, f"non-finite loss or gradient norm on some rank (here: {what})")
        return True

    def skip_update(self, engine, model: nn.Module) -> None:
        """Make the coming ``engine.step()`` a no-op for moetrain's own torch optimizer (ZeRO-0, fp32):
        no gradients, and DeepSpeed's ``overflow`` flag, which also holds back the LR schedule."""
        for p in model.parameters():
            p.grad = None
        engine.optimizer.overflow = True

    def after_step(self, engine, step: int, own_optimizer: bool, skipped: bool) -> bool:
        """Reset the flag; with DeepSpeed's optimizers, apply the policy to an update it skipped itself.
        Returns whether this step was skipped."""
        if own_optimizer:
            engine.optimizer.overflow = False
        elif not skipped and not engine.was_step_applied():
            norm = engine.get_global_grad_norm()
            self._count(step, f"non-finite gradient norm ({norm}); DeepSpeed skipped the update")
            skipped = True
        if not skipped:
            self.consecutive = 0
        return skipped

    def _count(self, step: int, why: str) -> None:
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: {why}; stopped before the optimizer step (weights and checkpoints are intact). "
                "Lower optim.lr, check the data, or set train.nonfinite=skip"
            )
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive > self.max_skips:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive non-finite steps skipped (train.nonfinite_max_skips="
                f"{self.max_skips}); stopping: {why}"
            )
