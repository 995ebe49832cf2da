"""Where would each tensor live on a GPU? A CPU run that marks the tensors a GPU run would keep on the host.

On a GPU machine, a tensor built without ``device=`` (``torch.zeros(2)``) or moved with ``.cpu()`` lives
on the host; one moved with ``.to(device)`` or built with an explicit device lives where it was told.
NCCL rejects host tensors. On the CPU every tensor is on the host, so gloo cannot tell them apart; this
module can: :class:`HostPlacement` (a ``TorchFunctionMode``) turns every tensor a GPU run would keep on
the host into a :class:`HostTensor` (a plain subclass; ops on it return ``HostTensor`` too, so the mark
follows the data), and clears the mark where code moves a tensor to an explicit device.
:func:`record_collectives` wraps ``torch.distributed``'s collectives to record, for every tensor handed to
them, whether it is marked and which line of code handed it over.

``python tests/placement.py train CONFIG ...`` (or under torchrun) is ``moetrain train`` with the marks on
from the first training step and the record written to ``RUN_DIR/placement_rank<r>.json`` at the end; the
failpoints of ``tests/faults.py`` are installed too when ``MOETRAIN_FAULT`` is set.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.eye, torch.linspace, torch.scalar_tensor,
}  # fmt: skip
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all_single",
    "reduce", "send", "recv", "isend", "irecv", "all_to_all", "gather", "scatter", "reduce_scatter",
)  # fmt: skip


class HostTensor(torch.Tensor):
    """A tensor that a GPU run would hold on the host."""


def _host(t):
    return t.as_subclass(HostTensor) if isinstance(t, torch.Tensor) and not isinstance(t, HostTensor) else t


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, HostTensor) else t


def _target(args, kwargs):
    """The device ``Tensor.to(...)`` names (a tensor names its own, marked or not), else None."""
    for a in (kwargs.get("device"), kwargs.get("other"), *args[1:]):
        if isinstance(a, torch.Tensor):
            return "host" if isinstance(a, HostTensor) else "device"
        if isinstance(a, (torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool)):
            return "device"
    return None


class HostPlacement(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None:
            return _host(out)
        if func is torch.Tensor.cpu:
            return _host(out)
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            where = "device" if func is torch.Tensor.cuda else _target(args, kwargs)
            if where == "device":
                return _plain(out)
            if where == "host":
                return _host(out)
        return out


def _caller() -> str:
    """The innermost frame outside torch: the line that handed the tensor over."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename:
            return f"{frame.filename.split('/site-packages/')[-1]}:{frame.lineno}"
    return "?"


def record_collectives(records: list[dict]) -> None:
    """Wrap torch.distributed's collectives: record each tensor argument, then run the collective on the
    same storage with the mark removed."""

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)

    def unmark(value):
        if isinstance(value, (list, tuple)):
            return type(value)(unmark(v) for v in value)
        return _plain(value)

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def wrapper(*args, __original=original, __name=name, **kwargs):
            for t in tensors(list(args) + list(kwargs.values())):
                records.append({"op": __name, "host": isinstance(t, HostTensor), "at": _caller()})
            return __original(*(unmark(a) for a in args), **{k: unmark(v) for k, v in kwargs.items()})

        setattr(dist, name, wrapper)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from faults import Failpoints

    from moetrain.cli import entry
    from moetrain.training.callbacks import Callback

    records: list[dict] = []
    record_collectives(records)
    mode = HostPlacement()

    class Marks(Callback):
        """Marks on from the first step; the record rewritten at every event (the process ends with
        os._exit, and the final checkpoint's save comes after on_train_end's callbacks)."""

        def on_train_start(self, trainer):
            mode.__enter__()

        def write(self, trainer):
            rank = dist.get_rank() if dist.is_initialized() else 0
            (Path(trainer.run_dir) / f"placement_rank{rank}.json").write_text(json.dumps(records))

        def on_step_end(self, trainer, result):
            self.write(trainer)

        def on_checkpoint(self, trainer, step, phase):
            self.write(trainer)

        def on_train_end(self, trainer):
            self.write(trainer)

    callbacks = [Marks()]
    if os.environ.get("MOETRAIN_FAULT"):
        callbacks.append(Failpoints(os.environ["MOETRAIN_FAULT"]))
    entry(callbacks=callbacks)


if __name__ == "__main__":
    main()
