"""Bytes and messages each rank sends within its node and across nodes, per token-exchange phase.

A :class:`moetrain.parallel.all_to_all.DispatchObserver` with the optional ``messages`` hook (the
dispatcher's ``Traffic`` counter of h3, moved off the dispatcher): ``dispatcher.observer =
Traffic(node of each EP rank)``. Exact, counted from the split sizes; rows a rank keeps for itself are
not sent. Used by tests/test_multinode.py and bench/ep_hierarchical.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass
class Traffic:
    node_of: tuple[int, ...]  # the node of each rank of the EP group, by EP rank
    sent: dict[tuple[str, str], int] = field(default_factory=dict)  # (phase, where) -> bytes
    msgs: dict[tuple[str, str], int] = field(default_factory=dict)  # (phase, where) -> non-empty messages
    exchanged_bytes: int = 0  # the observer's per-exchange byte total (to other ranks), summed

    def phase(self, name, device):
        return contextlib.nullcontext()

    def exchanged(self, nbytes: int) -> None:
        self.exchanged_bytes += nbytes

    def messages(self, phase: str, me: int, peers: list[int], rows: list[int], row_bytes: int) -> None:
        """``peers[j]``: the EP rank that gets ``rows[j]`` rows."""
        for peer, n in zip(peers, rows):
            if peer == me or n == 0:
                continue
            where = "within node" if self.node_of[peer] == self.node_of[me] else "across nodes"
            self.sent[phase, where] = self.sent.get((phase, where), 0) + n * row_bytes
            self.msgs[phase, where] = self.msgs.get((phase, where), 0) + 1

    def bytes(self, phase: str, where: str) -> int:
        return self.sent.get((phase, where), 0)

    def messages_sent(self, phase: str, where: str) -> int:
        return self.msgs.get((phase, where), 0)
