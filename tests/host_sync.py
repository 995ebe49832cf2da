"""Count operations that make the host wait for the device (the "no host sync" contract).

Works on any device, CPU included, because it recognises the *operations* that would synchronise
on a GPU rather than timing them::

    with HostSyncCounter() as syncs:
        out = layer(x_TD, token_ids_T)
        out.y_TD.sum().backward()
    assert syncs.count == 0, syncs.report()

Two hooks, because some conversions never reach the dispatcher on CPU:

- a TorchDispatchMode sees aten ops: ``_local_scalar_dense`` (``.item()``, ``int()``, ``float()``,
  tensor -> bool), ``is_nonzero``, ``nonzero``, ``masked_select``, ``unique``, ``equal``,
  ``bincount``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, and blocking
  copies between a CUDA tensor and the host (either direction: both end in a stream synchronise);
- a TorchFunctionMode sees ``Tensor.tolist`` / ``.numpy()`` / ``__array__``, which read CPU memory
  directly (no aten op) but copy device -> host on a GPU.

With ``host_data=True`` it also counts tensors built from Python data (``torch.tensor(x,
device=...)``, seen as ``lift_fresh``): on CUDA each is a blocking host -> device copy, a sync that a
CPU run cannot otherwise see because its "device" is the host.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the ground truth; this counter is the CPU
stand-in and names the source line of every event.

Code that only ever runs on the CPU may read a CPU tensor's values inside
:func:`moetrain.kernels.host_reads.cpu_host_read`, which this counter checks are CPU tensors and does not
count: there the read waits for nothing.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.kernels.host_reads import cpu_host_read, in_cpu_host_read  # noqa: F401 - re-exported

_aten = torch.ops.aten
_ALWAYS_SYNC = {
    _aten._local_scalar_dense.default,
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.equal.default,
    _aten.bincount.default,
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
_HOST_READS = {"tolist", "numpy", "__array__"}


@dataclass
class SyncEvent:
    op: str
    where: str  # "file:line in function" of the innermost frame outside torch


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "?"


def _is_bool_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _syncs(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    if func in _ALWAYS_SYNC:
        return True
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_bool_tensor(i) for i in indices or ())
    if func in _COPY_OPS:
        if func is _aten.copy_.default:
            src, dst_device, non_blocking = args[1], args[0].device, kwargs.get("non_blocking", False)
        else:
            src, dst_device, non_blocking = args[0], kwargs.get("device"), kwargs.get("non_blocking", False)
        if dst_device is None or non_blocking:
            return False
        dst_type = torch.device(dst_device).type
        return (src.is_cuda and dst_type == "cpu") or (src.device.type == "cpu" and dst_type == "cuda")
    return False


class _DispatchHook(TorchDispatchMode):
    def __init__(self, events: list[SyncEvent], host_data: bool) -> None:
        super().__init__()
        self.events = events
        self.host_data = host_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs) or (self.host_data and func is _aten.lift_fresh.default):
            self.events.append(SyncEvent(str(func), _caller()))
        return func(*args, **kwargs)


class _FunctionHook(TorchFunctionMode):
    def __init__(self, events: list[SyncEvent]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and in_cpu_host_read():
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                raise RuntimeError(f"cpu_host_read: Tensor.{name} of a tensor on {args[0].device}")
        elif name in _HOST_READS:
            self.events.append(SyncEvent(f"Tensor.{name}", _caller()))
        return func(*args, **(kwargs or {}))


@dataclass
class HostSyncCounter:
    """Context manager recording every host-synchronising operation run inside it."""

    host_data: bool = False  # also count tensors built from Python data (H2D copies on CUDA)
    events: list[SyncEvent] = field(default_factory=list)

    def __enter__(self) -> "HostSyncCounter":
        self._modes = (_FunctionHook(self.events), _DispatchHook(self.events, self.host_data))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def count(self) -> int:
        return len(self.events)

    def report(self) -> str:
        return "\n".join(f"{e.op} at {e.where}" for e in self.events) or "no host syncs"
