"""What the dense Llama-style decoders share: Llama, Qwen2 and Qwen3 (``moetrain upcycle``'s sources).

Each is the shared decoder of :mod:`.decoder` with one SwiGLU MLP of width ``intermediate_size`` in every
block and no experts: moetrain's model with ``moe: null`` (every block a ``DenseFFN``). The families differ
in attention biases, query/key norms and sliding windows; each module says which. These families map a
``config.json`` and the checkpoint's tensors onto moetrain's dense model exactly (tested: logits within
1e-5 of transformers' class, ``tests/test_upcycle.py``); import and export of dense models are not wired
to them (``moetrain import`` reads the MoE families only).
"""

from __future__ import annotations

from typing import Any

from moetrain.hf.families import decoder
from moetrain.hf.families.base import TensorRule
from moetrain.hf.families.decoder import Fields, refuse


def check(f: Fields, model_types: tuple[str, ...], default_theta: float) -> None:
    decoder.check_backbone(f, model_types, default_theta)
    if f["intermediate_size"] < 1:
        raise refuse("intermediate_size", f["intermediate_size"], "supported: 1 or more")


def check_qwen_windows(f: Fields) -> None:
    """Qwen2 / Qwen3: a layer slides only when ``layer_types`` says so and ``use_sliding_window`` is on
    (the classes' ``__post_init__`` sets the window to none otherwise); such a window must hide no key."""
    window = f["sliding_window"] if f["use_sliding_window"] else None
    kinds = f["layer_types"]
    if kinds is None:
        kinds = ["sliding_attention" if window is not None and i >= f["max_window_layers"] else "full_attention"
                 for i in range(f["num_hidden_layers"])]  # fmt: skip
    if set(kinds) - {"full_attention", "sliding_attention"} or len(kinds) != f["num_hidden_layers"]:
        raise refuse("layer_types", kinds, "supported: one of full_attention, sliding_attention per layer")
    if "sliding_attention" in kinds and window is not None:
        decoder.check_window("sliding_window", window, f)


def sections(f: Fields, default_theta: float, **attention: Any) -> dict[str, Any]:
    """``{"model": ..., "moe": None}``: the dense model, every block's MLP of width ``intermediate_size``."""
    return {"model": decoder.model_section(f, default_theta, d_ff=f["intermediate_size"], **attention), "moe": None}


def rules(sections_: dict[str, Any]) -> list[TensorRule]:
    """Embeddings, norms, head, attention and every block's MLP (:func:`.decoder.dense_mlp_rules`)."""
    model, _ = decoder.sections(**sections_)
    out = decoder.backbone_rules(model.n_layers, model.tie_embeddings)
    for i in range(model.n_layers):
        out += decoder.attention_rules(i, model)
        out += decoder.dense_mlp_rules(i, model.d_ff)
    return out
