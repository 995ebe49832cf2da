"""Initial (weights-only) checkpoints: a model's starting weights, without anything of a training run.

``moetrain import`` writes one as ``checkpoints/step_000000``: the format's usual files (``shared.safetensors``
with ``value/<param>`` and the imported buffers, ``experts_*.safetensors`` with ``value/<param>/<global
expert id>``), committed with :func:`moetrain.checkpoint.folders.commit`, and a ``state.json`` that says
``"weights_only": true``. It has no optimizer state, no LR schedule, no RNG states and no data
fingerprint: the data, the optimizer and the layout are chosen when training starts.

- ``eval``, ``generate`` and ``export`` load it like any checkpoint (they read values and the config);
- ``moetrain train`` starts from it at step 0 with a fresh optimizer, schedule and random streams, checks
  only that the job's model is the saved one (``training/resume_checks.py``, :func:`check_initial`), not the
  data, the batch or the world size, and loads on each rank only the experts that rank holds.

An import also keeps there, as ``unmapped.safetensors``, the source's tensors moetrain's model has no
place for but the family's checkpoints carry (DeepSeek-V3's multi-token-prediction layers), under their
own names and dtypes: the loaders never read it (the manifest covers it), and ``export`` of this
checkpoint writes them back, so an untrained import exports the folder it came from.

Buffers the checkpoint does not hold (e.g. a router's learned bias steps, 0 at the start) keep the values
the model is built with: both loaders read buffers with ``strict=False``.
"""

from __future__ import annotations

import time
from typing import Any

WEIGHTS_ONLY = "weights_only"
UNMAPPED = "unmapped.safetensors"


def initial_state(config: dict[str, Any], origin: dict[str, Any]) -> dict[str, Any]:
    """``state.json`` of an initial checkpoint. ``config``: the resolved job config (JSON form);
    ``origin``: where the weights came from (e.g. the imported folder and its model type)."""
    return {
        "step": 0,
        "tokens": 0,
        WEIGHTS_ONLY: True,
        "world_size": 1,  # a single consolidated copy: what `eval` replays the validation batches as
        "expert_parallel_size": 1,
        "origin": origin,
        "saved_at": time.time(),
        "config": config,
    }


def is_weights_only(state: dict[str, Any]) -> bool:
    """Whether ``state`` (a checkpoint's state.json) is an initial checkpoint's."""
    return bool(state.get(WEIGHTS_ONLY, False))
