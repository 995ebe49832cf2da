"""Router initialisation that does not depend on the router's size.

NOTE: each router of the StableMoE comparison (``stablemoe``, ``base``, ``hash``, and ``topk`` with
``init: orthogonal``) takes exactly one draw from the global RNG and initialises its parameters from a
private generator seeded by it. Models that differ only in the router therefore get the same backbone
and expert weights from the same seed, so the comparison isolates the routing method.
"""

from __future__ import annotations

import torch


def private_generator() -> torch.Generator:
    """A CPU generator seeded by one draw of the global RNG (drawn on the CPU also while the model is
    built on the meta device, where ``.item()`` has no value to read: moetrain.planning)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), device="cpu").item()))


@torch.no_grad()
def orthogonal_(weight: torch.Tensor, gain: float, gen: torch.Generator) -> None:
    """``nn.init.orthogonal_`` from ``gen``, computed on the CPU and copied in."""
    w = torch.empty(weight.shape, dtype=torch.float32)
    torch.nn.init.orthogonal_(w, gain=gain, generator=gen)
    weight.copy_(w)
