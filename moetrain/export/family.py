"""Export as a Hugging Face family's own class (``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``, ...).

The family modules (``moetrain/hf/families/``) hold both directions of the mapping: ``to_hf_config``
writes the ``config.json`` -- starting from the imported one (``RUN_DIR/hf/config.json``, so every field
moetrain does not own, token ids included, comes back as it was), or from the few fields given here for a
model trained in moetrain -- and ``rules(config)`` convert every parameter back into the per-expert
layout transformers 4 and 5 both load. The conversions are reshapes and concatenations only, so the
weights of an untrained import come back bit for bit, with the source tensors the model leaves out that
its step-0 checkpoint keeps (``unmapped.safetensors``: DeepSeek-V3's multi-token-prediction layers); a
later checkpoint's export leaves those out and its config.json says so (``family.without_skipped``).

The weights are written as fp32 and config.json says ``"dtype": "float32"``: that is what the files
hold (a checkpoint's master weights are fp32), so ``from_pretrained(dtype="auto")`` loads them without
rounding; a bf16 source's weights are exactly representable in fp32 and round back to the same bf16
bits, and a trained model's would be rounded only by a cast the user asks for.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open

from moetrain.checkpoint.initial import UNMAPPED
from moetrain.hf.convert import moetrain_value
from moetrain.hf.families.base import UnsupportedConfigError
from moetrain.hf.run_files import import_record_path
from moetrain.inference.loading import LoadedCheckpoint


def family_config(family: ModuleType, loaded: LoadedCheckpoint, base: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the checkpoint as ``family``'s class; raises UnsupportedConfigError (naming the
    moetrain field) when the family does not compute the model."""
    cfg = loaded.cfg
    model = cfg.model.model_dump(mode="json")
    moe = cfg.moe.model_copy(update={"expert_parallel_size": 1}).model_dump(mode="json") if cfg.moe else None
    out = family.to_hf_config(base, model, moe)
    if unmapped_left_out(loaded) and hasattr(family, "without_skipped"):
        out.update(family.without_skipped(out))
    out["dtype"] = "float32"  # what the files hold (see the module docstring)
    if "torch_dtype" in out:  # the name transformers 4 wrote
        out["torch_dtype"] = "float32"
    return out


def unmapped_left_out(loaded: LoadedCheckpoint) -> bool:
    """Whether the import left source tensors out of the model (DeepSeek-V3's multi-token-prediction layers)
    that this checkpoint does not carry: a trained one's export has none (they were not trained with it)."""
    record = import_record_path(loaded.run_dir)
    kept = json.loads(record.read_text()).get("unmapped_tensors") if record.is_file() else None
    return bool(kept) and not (loaded.folder / UNMAPPED).is_file()


@torch.no_grad()
def family_tensors(family: ModuleType, loaded: LoadedCheckpoint, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the family's per-expert layout, from the loaded model (parameters and the buffers a
    rule writes, e.g. DeepSeek-V3's correction bias; learned bias steps are folded into it first)."""
    model = loaded.model
    for layer in model.moe_layers():
        fold = getattr(layer.router, "fold_bias_steps", None)
        if fold is not None:
            fold()
    values = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out: dict[str, torch.Tensor] = {}
    if (loaded.folder / UNMAPPED).is_file():  # an import's step-0 checkpoint: the source's own, as they were
        with safe_open(str(loaded.folder / UNMAPPED), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    for rule in family.rules(config):
        if rule.index is not None:
            raise UnsupportedConfigError(rule.sources[0], "fused", "export writes the per-expert layout")
        for name, t in zip(rule.sources, rule.to_hf(moetrain_value(values, rule))):
            out[name] = t.detach().contiguous().clone()
    return out
