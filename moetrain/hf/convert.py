"""Apply a family's tensor rules: Hugging Face tensors into a moetrain model, and back out.

A rule reads its sources through ``read(name, index, rows)``, so a caller decides where tensors come
from: a state dict (:func:`state_dict_reader`) or safetensors files read lazily
(:func:`safetensors_reader`: only the slice an ``index`` rule needs is loaded). Each parameter (or
global expert's slice) is written once, in place; its shape is checked first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from moetrain.hf.families.base import TensorRule

# read(name, index, rows) -> the tensor, or its slice [index] / [index, rows[0]:rows[1]]
Reader = Callable[[str, int | None, tuple[int, int] | None], torch.Tensor]


def state_dict_reader(tensors: dict[str, torch.Tensor]) -> Reader:
    def read(name: str, index: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
        t = tensors[name]
        if index is None:
            return t
        return t[index] if rows is None else t[index, rows[0] : rows[1]]

    return read


def safetensors_reader(handles: dict[str, object]) -> Reader:
    """``handles``: tensor name -> an open ``safetensors.safe_open`` file that holds it."""

    def read(name: str, index: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
        f = handles[name]
        if index is None:
            return f.get_tensor(name)
        piece = f.get_slice(name)
        return piece[index] if rows is None else piece[index, rows[0] : rows[1]]

    return read


def sources_of(rule: TensorRule, read: Reader) -> list[torch.Tensor]:
    return [read(name, rule.index, rule.rows) for name in rule.sources]


@torch.no_grad()
def load_into(model: nn.Module, rules: Iterable[TensorRule], read: Reader) -> None:
    """Set every parameter the rules build; a tensor of the wrong shape is refused, naming both."""
    params = dict(model.named_parameters())
    for rule in rules:
        value = rule.to_moetrain(*sources_of(rule, read))
        target = params[rule.target]
        if rule.expert is not None:  # one global expert's slice [:, e] of a stacked [S, E, ...] parameter
            target = target[:, rule.expert]
        if value.shape != target.shape:
            raise ValueError(
                f"{rule.target}{'' if rule.expert is None else f' (expert {rule.expert})'}: built {tuple(value.shape)} "
                f"from {', '.join(rule.sources)}, but the model has {tuple(target.shape)}"
            )
        target.copy_(value)


def moetrain_value(params: dict[str, torch.Tensor], rule: TensorRule) -> torch.Tensor:
    """What ``rule.to_hf`` takes: the parameter, or its expert slice ``[:, e]`` (``[S, ...]``)."""
    param = params[rule.target]
    return param if rule.expert is None else param[:, rule.expert]


@torch.no_grad()
def hf_tensors(model: nn.Module, rules: Iterable[TensorRule]) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of a layout whose rules read whole tensors (no ``index``): the one
    ``rules(hf_config, None)`` gives, which export writes."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.index is not None:
            raise ValueError(
                f"{rule.sources[0]}: a fused tensor is assembled from several rules; export writes per name"
            )
        for name, t in zip(rule.sources, rule.to_hf(moetrain_value(params, rule))):
            out[name] = t.detach().contiguous()
    return out
