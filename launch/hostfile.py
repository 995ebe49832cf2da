"""DeepSpeed hostfiles (``HOST slots=N`` lines) and the ``--include`` / ``--exclude`` filters.

The resolution mirrors ``deepspeed.launcher.runner`` (filters first, then ``--num_nodes`` keeps the
first N hosts and ``--num_gpus`` the first P slots of each), so pre-flight knows the world size the
launcher will start, and a bad filter is reported before anything runs.

Worked example: hostfile ``a slots=4`` / ``b slots=4``, ``include="a@b:0,2"`` -> ``{a: [0, 1, 2, 3],
b: [0, 2]}``, world size 6; ``exclude="b"`` -> ``{a: [0, 1, 2, 3]}``, world size 4.
"""

from __future__ import annotations

import re

from moetrain.errors import UserError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def parse_hostfile(text: str, where: str) -> dict[str, int]:
    """``{host: slots}`` in file order; ``where`` names the file in messages."""
    pool: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise UserError(f"{where}, line {number}: {line!r} is not of the form 'HOST slots=N'")
        host, slots = match.group(1), int(match.group(2))
        if host in pool:
            raise UserError(f"{where}, line {number}: host {host!r} is listed twice")
        if slots < 1:
            raise UserError(f"{where}, line {number}: host {host!r} has slots={slots}; it must be >= 1")
        pool[host] = slots
    if not pool:
        raise UserError(f"{where} lists no hosts; write one 'HOST slots=N' line per node")
    return pool


def render_hostfile(hosts: list[str], slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def _parse_filter(spec: str, field: str) -> dict[str, list[int]]:
    """``"a@b:0,2"`` -> ``{"a": [], "b": [0, 2]}`` (an empty list means every slot)."""
    out: dict[str, list[int]] = {}
    for part in spec.split("@"):
        host, sep, slots = part.partition(":")
        if not host:
            raise UserError(f"launch.{field}: {spec!r} is not of the form HOST[:SLOT,...][@HOST...]")
        try:
            wanted = [int(s) for s in slots.split(",")] if sep else []
        except ValueError:
            raise UserError(f"launch.{field}: slots in {part!r} must be integers, e.g. {host}:0,1") from None
        out.setdefault(host, []).extend(wanted)
    return out


def _apply_filter(slots: dict[str, list[int]], spec: str, field: str) -> dict[str, list[int]]:
    chosen = _parse_filter(spec, field)
    for host, wanted in chosen.items():
        if host not in slots:
            raise UserError(f"launch.{field}: host {host!r} is not among the hosts ({', '.join(slots)})")
        missing = [s for s in wanted if s not in slots[host]]
        if missing:
            raise UserError(
                f"launch.{field}: host {host!r} has no slot {missing[0]} (it has slots 0-{len(slots[host]) - 1})"
            )
    if field == "include":
        kept = {h: sorted(set(chosen[h])) or s for h, s in slots.items() if h in chosen}
    else:
        kept = {
            h: [] if h in chosen and not chosen[h] else [x for x in s if x not in chosen.get(h, [])]
            for h, s in slots.items()
        }
    return {h: s for h, s in kept.items() if s}


def resolve(
    pool: dict[str, int], include: str | None, exclude: str | None, nodes: int | None, procs: int | None
) -> dict[str, list[int]]:
    """The slots the deepspeed launcher will use, ``{host: [slot, ...]}``."""
    slots = {h: list(range(n)) for h, n in pool.items()}
    if include or exclude:
        field = "include" if include else "exclude"
        slots = _apply_filter(slots, include or exclude or "", field)
        if not slots:
            raise UserError(f"launch.{field}: {include or exclude!r} leaves no slot to run on")
        return slots
    if nodes is not None:
        if nodes > len(slots):
            raise UserError(f"launch.nodes ({nodes}) exceeds the {len(slots)} host(s) of the hostfile")
        slots = dict(list(slots.items())[:nodes])
    if procs is not None:
        for host, have in slots.items():
            if procs > len(have):
                raise UserError(
                    f"{procs} processes per node (launch.procs_per_node / gpus_per_node) exceed "
                    f"the {len(have)} slots of host {host!r} in the hostfile"
                )
        slots = {h: list(range(procs)) for h in slots}
    return slots
