"""Balanced linear assignment (BASE layers): every expert takes a fixed share of the tokens, and the
total affinity is as large as possible.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

Capacities: ``c_i = floor(T/E)``, plus one for the first ``T mod E`` experts (the official BASE code
requires T divisible by E and pads the batch; we do not pad, and say which experts take the spare
tokens). Two solvers of the same problem:

- ``exact`` (default): a balanced start (pairs by descending score, first fit), then
  :func:`cancel_negative_cycles` until optimal. An assignment is optimal iff the residual graph of its
  min-cost flow has no negative cycle; with the token nodes collapsed that graph has one node per
  expert and an edge i -> j of weight ``min_{t in A_i} (s_ti - s_tj)`` (the affinity lost by moving t
  from i to j). Bellman-Ford finds a negative cycle in O(E^3); moving one token along every edge of
  it keeps the counts and strictly raises the total affinity. Host-side float64 numpy: ~10-100 ms for
  2-8K tokens and 8-32 experts on a CPU core, exact up to a 1e-9 relative tolerance.
- ``auction``: fairseq's ``libbase/balanced_assignment.cpp`` (Bertsekas' auction, the algorithm the
  BASE and StableMoE papers ran), vectorised in torch on the scores' device and generalised to unequal
  capacities. It is epsilon-optimal: the total affinity is within ``T * eps`` of the optimum, with
  ``eps = (max - min) / 50`` by default, as in the code; one host sync per bidding round.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch


def expert_capacities(num_tokens: int, num_experts: int) -> list[int]:
    """Tokens each expert must take: floor(T/E), and one more for the first T mod E experts."""
    q, r = divmod(num_tokens, num_experts)
    return [q + 1 if i < r else q for i in range(num_experts)]


def balanced_assignment(
    scores_TE: torch.Tensor, method: Literal["exact", "auction"] = "exact", eps_fraction: float = 0.02
) -> torch.Tensor:
    """Expert id of every token (int64, on the scores' device) under the balanced capacities."""
    num_tokens, num_experts = scores_TE.shape
    if num_experts == 1:
        return torch.zeros(num_tokens, dtype=torch.int64, device=scores_TE.device)
    caps = expert_capacities(num_tokens, num_experts)
    if method == "auction":
        return auction_assignment(scores_TE, caps, eps_fraction)
    return cancel_negative_cycles(scores_TE, _greedy_fill(scores_TE, caps)).to(scores_TE.device)


@torch.no_grad()
def auction_assignment(
    scores_TE: torch.Tensor, capacities: list[int], eps_fraction: float = 0.02, max_iterations: int = 100
) -> torch.Tensor:
    """fairseq's auction (``balanced_assignment.cpp``), experts bidding for tokens.

    Every round each expert i bids for its top-c_i tokens by value (score - price); its bid is that
    value minus the value of its (c_i+1)-th token, plus eps. Each token goes to its highest bidder and
    its price rises by that bid; a winner keeps a minimal bid (eps) on what it holds. It ends when
    every token has a bidder. After ``max_iterations`` rounds it switches, as the code does, to a fast
    approximation (won tokens keep their plain score instead of the maximum value).
    """
    score_ET = scores_TE.detach().float().t().contiguous()
    num_experts, num_tokens = score_ET.shape
    device = score_ET.device
    caps_E = torch.tensor(capacities, dtype=torch.int64, device=device)
    kmax = int(max(capacities))
    if kmax + 1 > num_tokens:  # too few tokens for a (c+1)-th value: start from a greedy fill
        return _greedy_fill(scores_TE, capacities)
    eps = ((score_ET.max() - score_ET.min()) * eps_fraction).clamp_min(1e-4)
    max_value = score_ET.max()
    value_ET = score_ET.clone()
    price_T = torch.zeros(num_tokens, device=device)
    slot_ok_EK = torch.arange(kmax, device=device)[None, :] < caps_E[:, None]
    tokens_T = torch.arange(num_tokens, device=device)
    held = None
    for rnd in range(100 * max_iterations):
        top_val_EK, top_idx_EK = value_ET.topk(kmax + 1, dim=1)
        kth_E = top_val_EK.gather(1, caps_E[:, None])  # value of each expert's (c_i+1)-th token
        inc_EK = torch.where(slot_ok_EK, top_val_EK[:, :kmax] - kth_E + eps, torch.zeros_like(kth_E))
        bids_ET = torch.zeros_like(value_ET).scatter_(1, top_idx_EK[:, :kmax], inc_EK)
        if held is not None and rnd < max_iterations:
            bids_ET.view(-1)[held] = eps  # keep what was won last round unless someone outbids
        high_T, bidder_T = bids_ET.max(dim=0)
        has_bid_T = high_T > 0
        if bool(has_bid_T.all()):  # the one host sync per round
            ids_T = bidder_T
            if torch.equal(torch.bincount(ids_T, minlength=num_experts), caps_E):
                return ids_T
            break  # degenerate ties; repair below
        price_T += high_T
        value_ET = score_ET - price_T[None, :]
        held = (bidder_T * num_tokens + tokens_T)[has_bid_T]
        if rnd < max_iterations:
            value_ET.view(-1)[held] = max_value  # the won token stays in its winner's top-c next round
        else:
            value_ET.view(-1)[held] = score_ET.view(-1)[held]
    return _greedy_fill(scores_TE, capacities)


def _greedy_fill(scores_TE: torch.Tensor, capacities: list[int]) -> torch.Tensor:
    """A balanced (not optimal) start: (token, expert) pairs by descending score, first fit."""
    num_tokens, num_experts = scores_TE.shape
    order = torch.argsort(scores_TE.detach().float().reshape(-1).cpu(), descending=True, stable=True).tolist()
    left = list(capacities)
    ids = [-1] * num_tokens
    placed = 0
    for flat in order:
        t, i = divmod(flat, num_experts)
        if ids[t] < 0 and left[i] > 0:
            ids[t], left[i] = i, left[i] - 1
            placed += 1
            if placed == num_tokens:
                break
    return torch.tensor(ids, dtype=torch.int64, device=scores_TE.device)


@torch.no_grad()
def cancel_negative_cycles(scores_TE: torch.Tensor, expert_ids_T: torch.Tensor, rel_tol: float = 1e-9) -> torch.Tensor:
    """Improve a balanced assignment to an optimal one with the same counts per expert.

    Runs in float64 numpy on the host: the graph has only E nodes, and these small ops are latency-bound.
    """
    s_TE = scores_TE.detach().double().cpu().numpy()
    ids_T = expert_ids_T.detach().cpu().numpy().astype(np.int64)
    num_tokens, num_experts = s_TE.shape
    tol = rel_tol * max(float(s_TE.max() - s_TE.min()), 1e-12)
    rows_T = np.arange(num_tokens)
    while True:
        lost_TE = s_TE[rows_T, ids_T][:, None] - s_TE  # affinity lost by moving t from a_t to j
        order = np.argsort(ids_T, kind="stable")
        counts_E = np.bincount(ids_T, minlength=num_experts)
        starts_E = np.cumsum(counts_E) - counts_E
        w_EE = np.minimum.reduceat(lost_TE[order], np.minimum(starts_E, num_tokens - 1), axis=0)
        w_EE[counts_E == 0] = np.inf  # an empty expert has no token to give
        np.fill_diagonal(w_EE, np.inf)
        cycle = _negative_cycle(w_EE, tol)
        if cycle is None:
            return torch.from_numpy(ids_T)
        moves = [(int(np.argmin(np.where(ids_T == i, lost_TE[:, j], np.inf))), j) for i, j in _edges(cycle)]
        for t, j in moves:  # distinct source experts -> distinct tokens
            ids_T[t] = j


def _edges(cycle: list[int]) -> list[tuple[int, int]]:
    return list(zip(cycle, cycle[1:] + cycle[:1]))


def _negative_cycle(w_EE: np.ndarray, tol: float) -> list[int] | None:
    """Experts on a cycle of total weight < -tol (in edge order), or None. Bellman-Ford from a
    virtual source joined to every expert with weight 0."""
    n = w_EE.shape[0]
    dist = np.zeros(n)
    pred = np.full(n, -1)
    cols = np.arange(n)
    for _ in range(n):
        cand = dist[:, None] + w_EE
        arg = cand.argmin(axis=0)
        best = cand[arg, cols]
        updated = best < dist - tol
        if not updated.any():
            return None
        dist = np.where(updated, best, dist)
        pred = np.where(updated, arg, pred)
    x = int(np.flatnonzero(updated)[0])
    for _ in range(n):  # n steps back along the predecessors land on a cycle
        x = int(pred[x])
        if x < 0:
            return None
    cycle = [x]
    y = int(pred[x])
    while y != x:
        cycle.append(y)
        y = int(pred[y])
    cycle.reverse()  # pred points backwards; edges go cycle[k] -> cycle[k+1]
    weight = sum(float(w_EE[i, j]) for i, j in _edges(cycle))
    return cycle if weight < -tol else None
