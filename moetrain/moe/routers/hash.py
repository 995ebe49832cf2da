"""Hash layer router (Roller et al. 2021): a fixed token-id -> expert table, gate 1, no aux loss.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

The table is a persistent buffer (saved in every checkpoint). The StableMoE paper's baseline is a
"randomly determined hash table" (its JSON tables were not released), so:

- ``random``: a seeded random permutation of the vocabulary dealt round-robin to the experts, so every
  expert owns floor(V/E) or ceil(V/E) token ids;
- ``balanced``: Roller et al.'s frequency-balanced hash: token ids by descending training frequency,
  each to the expert with the least total frequency so far (ties: fewest ids, then lowest expert id).
  It needs the training data's token counts, so the table starts as ``random`` and is rebuilt once at
  the start of a fresh run (:class:`HashTableFromFrequencies`, a hook the router declares); resumed runs
  load it from the checkpoint.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from moetrain.config.routers import HashRouterConfig
from moetrain.moe.hooks import HookContext, TrainingHooks
from moetrain.moe.routers.base import Router, RoutingDecision, zero_loss
from moetrain.moe.routers.init import private_generator


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

    @classmethod
    def declare_hooks(cls, routers: list[HashRouter]) -> list[TrainingHooks]:
        """``table: balanced``: the table is built from the training data's token frequencies."""
        if routers[0].cfg.table != "balanced":
            return []
        return [HashTableFromFrequencies(routers, routers[0].cfg.balance_tokens)]

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, group_size: int | None = None) -> RoutingDecision:
        """The expert is ``table[token id]``; the gate is 1 (the expert output is added unscaled)."""
        expert_ids_TK = self.table_V[token_ids_T][:, None]
        gates_TK = torch.ones(expert_ids_TK.shape, dtype=torch.float32, device=x_TD.device)
        return RoutingDecision(expert_ids_TK, gates_TK, zero_loss(x_TD), {}, None)


class HashTableFromFrequencies(TrainingHooks):
    """Frequency-balanced Hash table from the first ``max_tokens`` training tokens (fresh runs only:
    a resumed run has the table in its checkpoint). Every rank computes the same table. With a data
    mixture the tokens are taken from the sources in order, ``max_tokens`` in all."""

    def __init__(self, routers: list[HashRouter], max_tokens: int) -> None:
        self.routers = routers
        self.max_tokens = max_tokens

    def on_train_start(self, ctx: HookContext) -> None:
        if ctx.step > 0:
            return
        vocab = self.routers[0].table_V.numel()
        freq = np.zeros(vocab, dtype=np.int64)
        left = self.max_tokens
        for tokens in ctx.training_tokens():
            end = min(len(tokens), left)
            for start in range(0, end, 1 << 24):
                chunk = np.asarray(tokens[start : min(end, start + (1 << 24))])
                freq += np.bincount(chunk, minlength=vocab)[:vocab]
            left -= end
        table = balanced_table(freq, self.routers[0].num_experts)
        for router in self.routers:
            router.set_table(table)
