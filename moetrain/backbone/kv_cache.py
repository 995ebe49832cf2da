"""The key/value cache of autoregressive decoding (shapes: ``moetrain/backbone/__init__.py``).

One :class:`KVCache` per generated batch. Each attention layer appends the keys and values of the new
positions (after rotary positions are applied, so cached keys never change) and attends over all of
them. ``length`` counts the positions already cached; the model advances it once per forward, after
every layer has appended, so all layers agree on where the new tokens start.

Multi-head latent attention (``backbone/mla.py``) stores its normalised key/value latent [B, 1, P, R] as
the "keys" and its rotated shared rotary key [B, 1, P, P2] as the "values", and expands them each step.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [B, G, P, A] per attention layer
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # positions cached (the next token's position)

    def append(self, layer: int, k_BGSA: torch.Tensor, v_BGSA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values of ``layer``; return all of them (old + new)."""
        if self.keys[layer] is not None:
            k_BGSA = torch.cat([self.keys[layer], k_BGSA], dim=2)
            v_BGSA = torch.cat([self.values[layer], v_BGSA], dim=2)
        self.keys[layer], self.values[layer] = k_BGSA, v_BGSA
        return k_BGSA, v_BGSA

    def advance(self, new_positions: int) -> None:
        self.length += new_positions
