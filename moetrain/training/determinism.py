"""``train.deterministic``: bitwise-reproducible runs on the CPU at the default thread count."""

from __future__ import annotations

import torch


def apply_determinism(enabled: bool) -> None:
    """Make the ops a run uses deterministic (called once per process, before the model is built)."""
    if enabled:
        torch.use_deterministic_algorithms(True)
