"""Write a safetensors file one tensor at a time, so a file larger than memory can be written.

``safetensors.torch.save_file`` takes every tensor of a file at once. An import knows every tensor's
name, dtype and shape before it reads any (the source's headers and the model built on the meta
device), so :class:`SafetensorsWriter` writes the header first and then each tensor's bytes as it
arrives, in the header's order: one tensor is in memory at a time.

The file is an ordinary safetensors file (``safe_open`` and ``load_file`` read it): an 8-byte
little-endian header length, the JSON header (padded with spaces to a multiple of 8 bytes, as
safetensors writes it), then the tensors' bytes back to back. Tensors are little-endian, as torch holds
them on the CPUs moetrain runs on.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF = {name: dtype for dtype, name in DTYPES.items()}  # safetensors' dtype names -> torch


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor: its key, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """``with SafetensorsWriter(path, specs) as w: w.write(key, tensor)`` for every spec, in order.

    Each tensor must be the next one the header names, with its dtype and shape (checked: a mismatch
    raises ValueError before anything of it is written). Leaving the ``with`` block before every tensor
    is written raises, so a short file is never taken for a complete one.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":  # pragma: no cover - every machine moetrain runs on is little-endian
            raise RuntimeError("SafetensorsWriter writes the host's bytes, which must be little-endian")
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError("SafetensorsWriter: a key appears twice")
        self.path, self.specs, self.next = Path(path), specs, 0
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for spec in specs:
            header[spec.key] = {
                "dtype": DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        self.file.write(struct.pack("<Q", len(text)))
        self.file.write(text)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.specs):
            raise ValueError(f"{self.path.name}: {key} is not in the header (every tensor is written)")
        spec = self.specs[self.next]
        if key != spec.key or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path.name}: expected {spec.key} {spec.dtype} {list(spec.shape)} next, "
                f"got {key} {tensor.dtype} {list(tensor.shape)}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.file.write(memoryview(flat.view(torch.uint8).numpy()))
        self.next += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None and self.next != len(self.specs):
            raise ValueError(
                f"{self.path.name}: {len(self.specs) - self.next} of {len(self.specs)} tensors were never written"
            )
