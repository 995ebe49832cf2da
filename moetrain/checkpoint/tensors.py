"""The tensor files of a checkpoint: their keys, reading and writing (see ``moetrain.checkpoint``).

Keys: ``<kind>/<param>`` in ``shared.safetensors`` for non-expert parameters (kind: ``value`` -- the fp32
value, ``exp_avg``, ``exp_avg_sq``, ``step``), ``buffer/<name>`` for module buffers, and
``<kind>/<param>/<global expert id>`` in ``experts_<EP rank>.safetensors`` for each expert's slice
``[:, e]`` of a stacked expert parameter (``step/<param>`` once per file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moetrain.errors import UserError

SHARED = "shared.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def experts_file(ep_rank: int) -> str:
    return f"experts_{ep_rank:05d}.safetensors"


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file (tensors made contiguous; no pickles)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def open_tensors(path: Path, what: str = "checkpoint.resume"):
    """A lazy safetensors reader; a missing or damaged file is a UserError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{what}: {path} is not a readable safetensors file ({exc})") from None


class ExpertIndex:
    """Every expert slice of a checkpoint, whichever file holds it (an EP rank's, or an import's per-layer
    files); reads only what is asked, and lists what it read in ``read`` (the keys, in order)."""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, Any] = {}
        self.read: list[str] = []
        for f in sorted(folder.glob("experts_*.safetensors")):
            handle = open_tensors(f)
            self.where.update({k: handle for k in handle.keys()})

    def entry(self, name: str, ids: range) -> dict[str, torch.Tensor]:
        """``value`` (and the moments and ``step`` where saved) of parameter ``name`` for the global
        experts ``ids``, stacked on dim 1 as the model holds them."""
        out = {}
        for key in ("value", *MOMENTS):
            wanted = [f"{key}/{name}/{g}" for g in ids]
            have = [k in self.where for k in wanted]
            if not any(have) and key != "value":
                continue
            if not all(have):
                missing = wanted[have.index(False)]
                raise UserError(f"checkpoint.resume: the checkpoint holds no {missing} (saved with fewer experts?)")
            out[key] = torch.stack([self.where[k].get_tensor(k) for k in wanted], dim=1)
            self.read += wanted
        if f"step/{name}" in self.where:
            out["step"] = self.where[f"step/{name}"].get_tensor(f"step/{name}")
        return out


def shared_entry(shared, keys: set[str], name: str) -> dict[str, torch.Tensor]:
    """``value`` and the optimizer state saved for the non-expert parameter ``name``."""
    return {key: shared.get_tensor(f"{key}/{name}") for key in ("value", *MOMENTS, "step") if f"{key}/{name}" in keys}


def read_buffers(folder: Path) -> dict[str, torch.Tensor]:
    """The module buffers (router stage, hash table, ...) of a checkpoint."""
    handle = open_tensors(folder / SHARED, "checkpoint")
    return {k[len("buffer/") :]: handle.get_tensor(k) for k in handle.keys() if k.startswith("buffer/")}


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model, every global expert stacked in order, whatever layout saved it (fp32)."""
    shared = open_tensors(folder / SHARED, "checkpoint")
    out = {k[len("value/") :]: shared.get_tensor(k) for k in shared.keys() if k.startswith("value/")}
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(folder.glob("experts_*.safetensors")):
        handle = open_tensors(f, "checkpoint")
        for key in handle.keys():
            if key.startswith("value/"):
                _, name, g = key.split("/")
                slices.setdefault(name, {})[int(g)] = handle.get_tensor(key)
    for name, by_id in slices.items():
        out[name] = torch.stack([by_id[g] for g in sorted(by_id)], dim=1)
    return out
