"""StableMoE's stage state, shared by the router (``stablemoe.py``) and its schedule hook
(``stablemoe_schedule.py``): the stages, why stage 1 ended, and the switch-statistics ring's layout."""

from __future__ import annotations

import enum


class RouterStage(enum.IntEnum):
    LEARN = 0  # stage 1: backbone routing, balance + distillation losses
    FROZEN = 1  # stage 2: frozen distilled routing, no routing losses


class SwitchReason(enum.IntEnum):
    """Why stage 1 ended (logged as ``moe/switch_reason``)."""

    NONE = 0  # not switched yet
    STEPS = 1  # switch: steps -- stage1_steps reached
    CRITERIA = 2  # switch: adaptive -- agreement and load met the thresholds over the window
    MAX_STEPS = 3  # switch: adaptive -- the criteria were not met by stage1_steps


# A row of the switch-statistics ring: [valid, agreement, distillation loss, load_E, distilled_load_E].
# NOTE: int64 (agreement and loss in millionths, loads as counts) so that a bf16/fp16 engine, which
# casts floating buffers, cannot round them.
WINDOW_STATS = 3
WINDOW_SCALE = 1_000_000

# The optimizer-group tag of D and Ê: the switch zeroes that group's learning rate and weight decay.
DISTILLED_GROUP = "distilled_router"
