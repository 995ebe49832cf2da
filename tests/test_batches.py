"""Batches reach a GPU from pinned memory without blocking the host (``moetrain/training/batches.py``),
and the trainer moves every batch that way."""

from __future__ import annotations

import ast

import torch
from conftest import REPO

from moetrain.training.batches import to_device


class Recorder:
    """Stands in for a host tensor: records how it is moved."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


def test_to_a_gpu_from_pinned_memory_without_blocking():
    calls: list = []
    to_device(Recorder(calls), torch.device("cuda", 1))
    assert calls == ["pin_memory", ("to", "cuda:1", True)]
    calls.clear()
    to_device(Recorder(calls), torch.device("cpu"))
    assert calls == [("to", "cpu", False)]


def test_the_trainer_moves_batches_only_through_to_device():
    """No ``x.to(device)`` of a batch left in the loop, the evaluation or the hooks' forward."""
    for name in ("trainer.py", "moe_hooks.py"):
        tree = ast.parse((REPO / "moetrain" / "training" / name).read_text())
        bare = [
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "to"
        ]
        assert bare == [], f"{name}: .to(...) at lines {bare}; use moetrain.training.batches.to_device"
