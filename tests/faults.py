"""Failpoints: the reliability tests make a run fail on purpose at named places, through a training
callback this file installs (the package itself holds no fault injection).

``MOETRAIN_FAULT`` holds comma-separated ``POINT@STEP`` or ``POINT@STEP:rankR`` entries; at a matching
point the callback acts. Points:

- ``kill_mid_save``: SIGKILL after this rank wrote its checkpoint files, before the commit;
- ``kill_after_commit``: SIGKILL after the checkpoint is committed, before older ones are pruned;
- ``kill_after_finish_check``: SIGKILL once a rerun of a finished run has decided there is nothing to do;
- ``nan_loss``: this rank's loss becomes NaN at that step (every micro-batch of it);
- ``hang``: this rank stops answering at that step (sleeps), as a stuck GPU or host would.

Run a job with them as ``python tests/faults.py train CONFIG ...`` -- under torchrun,
``torchrun ... tests/faults.py train ...`` -- which is ``moetrain train`` with the callback added
(``moetrain.cli.entry(callbacks=...)``); ``tests/conftest.py`` does this whenever a test's environment
sets ``MOETRAIN_FAULT``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

from moetrain.training.callbacks import Callback


def active(spec: str, point: str, step: int, rank: int) -> bool:
    """Whether ``spec`` asks for ``point`` at ``step`` on ``rank``."""
    for entry in spec.split(","):
        name, _, where = entry.strip().partition("@")
        at, _, who = where.partition(":")
        if name == point and at.isdigit() and int(at) == step and who in ("", f"rank{rank}"):
            return True
    return False


class Failpoints(Callback):
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.nan_hook = None

    def _at(self, point: str, step: int, trainer) -> bool:
        return active(self.spec, point, step, trainer.layout.rank)

    def _announce(self, point: str, step: int, trainer, what: str) -> None:
        print(f"fault injected: {point} at step {step} on rank {trainer.layout.rank}: {what}", flush=True)

    def _kill(self, point: str, step: int, trainer) -> None:
        if self._at(point, step, trainer):
            self._announce(point, step, trainer, "SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_start(self, trainer, step: int) -> None:
        if self._at("nan_loss", step + 1, trainer):
            self.nan_hook = trainer.model.register_forward_hook(_nan_loss)
        if self._at("hang", step + 1, trainer):
            self._announce("hang", step + 1, trainer, "hanging")
            while True:
                time.sleep(3600)

    def on_step_end(self, trainer, result) -> None:
        if self.nan_hook is not None:
            self.nan_hook.remove()
            self.nan_hook = None

    def on_checkpoint(self, trainer, step: int, phase: str) -> None:
        self._kill({"written": "kill_mid_save", "committed": "kill_after_commit"}[phase], step, trainer)

    def on_nothing_to_do(self, trainer) -> None:
        self._kill("kill_after_finish_check", trainer.state.step, trainer)


def _nan_loss(module, inputs, out):
    """Forward hook: the training loss (what backward sees) becomes NaN; evaluation is untouched."""
    if out.loss is None or not module.training:
        return out
    return dataclasses.replace(out, loss=out.loss * float("nan"))


if __name__ == "__main__":
    from moetrain.cli import entry

    entry(callbacks=[Failpoints(os.environ.get("MOETRAIN_FAULT", ""))])
