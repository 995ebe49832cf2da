"""A local Hugging Face model folder, read without running anything in it (``moetrain import SRC``).

What is read: ``config.json`` (JSON), and the safetensors shards -- those ``model.safetensors.index.json``
names, or without an index every ``*.safetensors`` file. :func:`read_source` opens every shard's header
with ``safe_open`` (names, dtypes, shapes; a damaged or truncated file fails here) before any tensor is
read; :meth:`HFSource.reader` then reads one tensor, or one expert's slice of a fused tensor, at a time
(:class:`ShardFile`: only those bytes, without a memory map).

Nothing here can execute code: a folder whose weights are only PyTorch pickles (``pytorch_model.bin``,
``*.pt``) is refused (pickles run code when loaded), and so is a ``config.json`` with ``auto_map``,
which transformers itself loads only with ``trust_remote_code``. Every problem is one
:class:`~moetrain.errors.UserError` naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moetrain.checkpoint.streaming import DTYPE_OF
from moetrain.errors import UserError
from moetrain.hf.convert import Reader

INDEX = "model.safetensors.index.json"
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the folder, from its shard's header."""

    file: Path
    dtype: str  # safetensors' name: F32, BF16, F16, ...
    shape: tuple[int, ...]


@dataclass
class HFSource:
    folder: Path
    config: dict[str, Any]  # config.json as written
    tensors: dict[str, SourceTensor]  # every tensor of the weights, by name

    def reader(self) -> Reader:
        """``read(name, index, rows)``: the tensor, or one expert's slice ``[index]`` (rows ``a:b`` of it),
        read from its shard with plain reads of just those bytes (:class:`ShardFile`)."""
        shards: dict[Path, ShardFile] = {}

        def read(name: str, index: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
            path = self.tensors[name].file
            if path not in shards:
                shards[path] = ShardFile(path)
            return shards[path].read(name, index, rows)

        return read


class ShardFile:
    """A safetensors file (headers checked by :func:`read_source` through ``safe_open``) read with plain
    ``readinto`` calls of just the bytes a tensor or slice occupies.

    NOTE: not ``safe_open``'s memory map: the pages a map has read stay in the process's resident set
    while the file is open, so reading a model through maps shows a resident set as large as the model
    (measured: 1.3 GB for a 1.26 GB source) although no copy of it is held. A tensor's bytes are
    contiguous (row-major), and so are ``[index]`` and ``[index, a:b]`` of it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(size))
        self.data_start = 8 + size

    def read(self, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        meta = self.header[name]
        dtype, shape = DTYPE_OF[meta["dtype"]], list(meta["shape"])
        item = torch.empty((), dtype=dtype).element_size()
        start = meta["data_offsets"][0]
        if index is not None:  # one row of the first dim: contiguous
            start += index * math.prod(shape[1:]) * item
            shape = shape[1:]
            if rows is not None:
                start += rows[0] * math.prod(shape[1:]) * item
                shape = [rows[1] - rows[0], *shape[1:]]
        out = torch.empty(shape, dtype=dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(buffer)) != buffer.nbytes:
                raise UserError(
                    f"SRC: shard {str(self.path)!r} ended inside tensor {name} (truncated since it was checked)"
                )
        return out


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a UserError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what}: {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{what}: {str(path)!r} is not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: {str(path)!r} must hold a JSON object, not {type(value).__name__}")
    return value


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json``; a config that needs code from the folder (``auto_map``) is refused."""
    if not folder.is_dir():
        raise UserError(f"SRC: {str(folder)!r} is not a folder; give a local Hugging Face model folder")
    config = read_json(folder / "config.json", "SRC")
    if config.get("auto_map"):
        raise UserError(
            f"SRC: {str(folder / 'config.json')!r} names code of its own (auto_map: {config['auto_map']}), which "
            "transformers runs only with trust_remote_code; moetrain imports the families it maps natively "
            "(docs/import.md) and never runs code from a model folder"
        )
    return config


def read_source(folder: Path) -> HFSource:
    """1. config.json; 2. the shards (index or glob); 3. every shard's header, checked."""
    config = read_config(folder)
    files = _shard_files(folder)
    tensors: dict[str, SourceTensor] = {}
    for path, wanted in files.items():
        with _open(path) as f:
            names = set(f.keys())
            for name in sorted(names if wanted is None else wanted):
                if name not in names:
                    raise UserError(
                        f"SRC: {INDEX} puts tensor {name} in {path.name}, which does not hold it; the shard is "
                        "not the one the index was written with (download it again)"
                    )
                if name in tensors:
                    raise UserError(
                        f"SRC: tensor {name} is in both {tensors[name].file.name} and {path.name}; "
                        f"remove the stray file or add the {INDEX} that says which one is meant"
                    )
                piece = f.get_slice(name)
                tensors[name] = SourceTensor(path, piece.get_dtype(), tuple(piece.get_shape()))
    return HFSource(folder, config, tensors)


def _shard_files(folder: Path) -> dict[Path, set[str] | None]:
    """Shard -> the tensor names the index assigns to it (None without an index: all it holds)."""
    if (folder / INDEX).is_file():
        index = read_json(folder / INDEX, "SRC")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"SRC: {str(folder / INDEX)!r} has no weight_map (tensor name -> shard file)")
        files: dict[Path, set[str] | None] = {}
        for name, file in weight_map.items():
            path = folder / str(file)
            if Path(str(file)).is_absolute() or ".." in Path(str(file)).parts or path.suffix != ".safetensors":
                raise UserError(f"SRC: {INDEX} names {file!r} for {name}; expected a .safetensors file in the folder")
            if not path.is_file():
                raise UserError(f"SRC: shard {str(path)!r} is missing ({INDEX} puts {name} there); download it again")
            files.setdefault(path, set()).add(name)
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return dict.fromkeys(shards)
    pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
    if pickles:
        raise UserError(
            f"SRC: {str(folder)!r} holds its weights only as PyTorch pickles ({', '.join(pickles[:3])}), which can run "
            "code when loaded; moetrain imports safetensors only. Convert them once where you trust the files, "
            "e.g. AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(NEW_SRC) (transformers writes "
            "safetensors), then import NEW_SRC"
        )
    raise UserError(f"SRC: {str(folder)!r} holds no *.safetensors weights (and no {INDEX})")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"SRC: shard {str(path)!r} is not a readable safetensors file ({exc}); it is damaged or incomplete "
            "(download it again)"
        ) from None
