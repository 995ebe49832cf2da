"""Memory sizes as people write them (``80GB``, ``1.5GiB``, ``512MB``) and as the planner prints them."""

from __future__ import annotations

import re

from moetrain.errors import UserError

# NOTE: GB and GiB both mean 2**30 bytes: a GPU sold as "80GB" holds 80 GiB.
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, flag: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"{flag} ({text!r}) is not a memory size; write e.g. 80GB, 141GiB or 512MB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value <= 0:
        raise UserError(f"{flag} ({text!r}) must be more than 0 bytes")
    return int(value)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
