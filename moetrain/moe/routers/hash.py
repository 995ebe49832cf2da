"""Hash layer router (Roller et al. 2021): a fixed token-id -> expert table, gate 1, no aux loss.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

The table is a persistent buffer (saved in every checkpoint). The StableMoE paper's baseline is a
"randomly determined hash table" (its JSON tables were not released), so:

- ``random``: a seeded random permutation of the vocabulary dealt round-robin to the experts, so every
  expert owns floor(V/E) or ceil(V/E) token ids;
- ``balanced``: Roller et al.'s frequency-balanced hash: token ids by descending training frequency,
  each to the expert with the least total frequency so far (ties: fewest ids, then lowest expert id).
  It needs the training data's token counts, so the table starts as ``random`` and is rebuilt once at
  the start of a fresh run (``moetrain/training/routing.py``); resumed runs load it from the checkpoint.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from moetrain.config.routers import HashRouterConfig
from moetrain.moe.routers.init import private_generator
from moetrain.moe.routing import Router, RoutingDecision, zero_loss


def random_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=gen) % num_experts


def balanced_table(freq_V: np.ndarray, num_experts: int) -> torch.Tensor:
    """Greedy fill of the emptiest expert, most frequent token ids first (deterministic)."""
    order = np.argsort(-np.asarray(freq_V, dtype=np.int64), kind="stable")
    heap = [(0, 0, e) for e in range(num_experts)]  # (total frequency, ids owned, expert)
    table = np.zeros(len(order), dtype=np.int64)
    for v in order.tolist():
        load, owned, e = heapq.heappop(heap)
        table[v] = e
        heapq.heappush(heap, (load + int(freq_V[v]), owned + 1, e))
    return torch.from_numpy(table)


class HashRouter(Router):
    def __init__(self, cfg: HashRouterConfig, num_experts: int, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = 1
        private_generator()  # unused: one global draw like every router (see routers/init.py)
        self.register_buffer("table_V", random_table(vocab_size, num_experts, cfg.seed))

    @torch.no_grad()
    def set_table(self, table_V: torch.Tensor) -> None:
        self.table_V.copy_(table_V.to(self.table_V))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> RoutingDecision:
        """The expert is ``table[token id]``; the gate is 1 (the expert output is added unscaled)."""
        expert_ids_TK = self.table_V[token_ids_T][:, None]
        gates_TK = torch.ones(expert_ids_TK.shape, dtype=torch.float32, device=x_TD.device)
        return RoutingDecision(expert_ids_TK, gates_TK, zero_loss(x_TD), {}, None)
