"""Failpoints: named places where the reliability tests make a run fail on purpose.

``MOETRAIN_FAULT`` holds comma-separated ``POINT@STEP`` or ``POINT@STEP:rankR`` entries; at a matching
point the caller acts (a kill, a hang, a NaN). Without the variable every check is one dictionary
lookup. Points:

- ``kill_mid_save``: SIGKILL after this rank wrote its checkpoint files, before the commit;
- ``kill_after_commit``: SIGKILL after the checkpoint is committed, before older ones are pruned;
- ``kill_after_finish_check``: SIGKILL while a rerun of a finished run decides there is nothing to do;
- ``nan_loss``: this rank's loss becomes NaN at that step;
- ``hang``: this rank stops answering at that step (sleeps), as a stuck GPU or host would.
"""

from __future__ import annotations

import os
import signal
import time


def active(point: str, step: int, rank: int) -> bool:
    """Whether ``MOETRAIN_FAULT`` asks for ``point`` at ``step`` on ``rank``."""
    spec = os.environ.get("MOETRAIN_FAULT")
    if not spec:
        return False
    for entry in spec.split(","):
        name, _, where = entry.strip().partition("@")
        at, _, who = where.partition(":")
        if name == point and at.isdigit() and int(at) == step and who in ("", f"rank{rank}"):
            return True
    return False


def kill_if(point: str, step: int, rank: int) -> None:
    if active(point, step, rank):
        print(f"fault injected: {point} at step {step} on rank {rank}: SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def hang_if(point: str, step: int, rank: int) -> None:
    if active(point, step, rank):
        print(f"fault injected: {point} at step {step} on rank {rank}: hanging", flush=True)
        while True:
            time.sleep(3600)
