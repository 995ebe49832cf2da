"""Batches from the host to the training device."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (built on the host by the data stream) on ``device``. To a GPU it goes from pinned (page-locked)
    memory without blocking the host, so the copy overlaps with the host's next work; the pinned buffer is
    held by the caching host allocator until the copy is done. Elsewhere a plain ``.to``."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
