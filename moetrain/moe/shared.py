"""Shared experts (DeepSeekMoE): FFNs every token passes through, beside the routed experts.

N shared experts of width h are one FFN of width N*h: each hidden unit belongs to one expert and the
experts' outputs add, so the two are the same function. They are ordinary (replicated, data-parallel)
parameters: not sharded by expert parallelism, not named ``.experts.``. Initialised like the routed
experts: input weights N(0, 1/d_model), output weights N(0, 1/(N*h)).

``moe.shared_expert_gate`` (Qwen2-MoE): the branch's output is scaled per token by ``sigmoid(x w_gate)``,
one learned ``[d_model, 1]`` weight (N(0, 1/d_model)) for all the shared experts of the layer together.

Shape suffixes: the legend in ``moetrain/moe/__init__.py`` (F: the shared width N*h).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SharedExperts(nn.Module):
    def __init__(self, kind: str, d_model: int, width: int, gated: bool = False) -> None:
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"shared experts are gelu or swiglu FFNs (got {kind!r})")
        self.kind = kind
        self.w_in_DF = nn.Parameter(torch.randn(d_model, width * (2 if kind == "swiglu" else 1)) / math.sqrt(d_model))
        self.w_out_FD = nn.Parameter(torch.randn(width, d_model) / math.sqrt(width))
        self.w_gate_D1 = nn.Parameter(torch.randn(d_model, 1) / math.sqrt(d_model)) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TF = x_TD @ self.w_in_DF
        if self.kind == "swiglu":
            gate_TF, up_TF = h_TF.chunk(2, dim=-1)
            h_TF = F.silu(gate_TF) * up_TF
        else:
            h_TF = F.gelu(h_TF)
        y_TD = h_TF @ self.w_out_FD
        if self.w_gate_D1 is not None:
            y_TD = torch.sigmoid(x_TD @ self.w_gate_D1) * y_TD
        return y_TD
