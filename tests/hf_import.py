"""Test helpers for the Hugging Face families: tiny transformers models, and the rules applied to a
checkpoint's tensors (a dict, or safetensors files read one rule at a time, ``get_slice`` for ``index``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from moetrain.config.model import ModelConfig, MoEConfig
from moetrain.hf.families.base import TensorRule
from moetrain.model import MoETransformer

Reader = Callable[[str, int | None], torch.Tensor]  # (tensor name, index or None) -> tensor


def dict_reader(tensors: dict[str, torch.Tensor]) -> Reader:
    return lambda name, index: tensors[name] if index is None else tensors[name][index]


class SafetensorsReader:
    """Reads tensors from the ``*.safetensors`` files of a folder; an ``index`` read takes only that slice
    (``get_slice``), so a fused [E, ...] tensor is never loaded whole. Counts what it read."""

    def __init__(self, folder: Path) -> None:
        self.files = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                self.files.update({k: path for k in f.keys()})
        self.sliced: list[tuple[str, int]] = []

    def names(self) -> set[str]:
        return set(self.files)

    def __call__(self, name: str, index: int | None) -> torch.Tensor:
        with safe_open(str(self.files[name]), "pt") as f:
            if index is None:
                return f.get_tensor(name)
            self.sliced.append((name, index))
            return f.get_slice(name)[index]


def build_state(rules: list[TensorRule], read: Reader, model: MoETransformer) -> dict[str, torch.Tensor]:
    """moetrain tensors from the rules: whole parameters, and each global expert's slice [:, e]."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for rule in rules:
        value = rule.to_moetrain(*(read(s, rule.index) for s in rule.sources))
        if rule.expert is None:
            assert state[rule.target].shape == value.shape, (rule.target, value.shape)
            assert state[rule.target].dtype == value.dtype, (rule.target, value.dtype)
            state[rule.target] = value
        else:
            state[rule.target][:, rule.expert] = value  # [S, D, F]: the stacked slice of one global expert
    if model.cfg.tie_embeddings:  # one tensor under two names: the output head is the embedding
        state["lm_head.weight"] = state["embed.weight"]
    return state


def moetrain_model(sections: dict, rules: list[TensorRule], read: Reader) -> MoETransformer:
    """The moetrain model of ``to_moetrain``'s sections with every tensor from the rules, fp32, eval."""
    model_cfg = ModelConfig(**sections["model"])
    moe_cfg = MoEConfig(**{"kernels": "torch", **sections["moe"]}) if sections["moe"] else None
    model = MoETransformer(model_cfg, moe_cfg)
    model.load_state_dict(build_state(rules, read, model))
    return model.eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and float buffer of a transformers model random (norms and biases included), so
    that no weight the mapping could confuse is left at a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
