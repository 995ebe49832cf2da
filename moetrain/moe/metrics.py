"""MoE health metrics: expert load, dropped tokens, router entropy, gate statistics, aux-loss terms.

Shape suffixes: the legend in ``moetrain/moe/__init__.py``.

Per layer ``i`` (``moe/layer{i}/...``): ``load``, ``load_{min,max,std}``, ``load_max_over_mean``,
``dropped_frac``, ``router_entropy``; ``gate_mean`` (mean gate value over all (token, slot) pairs) and
``gate_low_frac`` (the fraction of gates below :data:`GATE_LOW` = 0.1: a collapsed sigmoid gate
switches the expert off for that token); every aux term of the router (scalars: their mean; a
per-expert vector such as StableMoE's ``distilled_load``: its ``<name>_max_over_mean``).

Per-micro-batch stats stay on the device; :class:`MoEMetrics` sums them over a log interval and
reduces them over the ranks once per log line (the only host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # a type only: importing the routers package here would import every router
    from moetrain.moe.routers.base import RoutingDecision


GATE_LOW = 0.1  # a gate below this counts in gate_low_frac


@dataclass(frozen=True)
class LayerStats:
    load_E: torch.Tensor  # (token, slot) pairs routed to each expert, before dropping (float)
    dropped: torch.Tensor  # pairs dropped by the capacity (float scalar)
    entropy_sum: torch.Tensor  # sum over tokens of the routing-distribution entropy
    num_tokens: torch.Tensor
    aux_terms: dict[str, torch.Tensor]
    gate_sum: torch.Tensor | None = None  # sum of the gates of all (token, slot) pairs
    gate_low: torch.Tensor | None = None  # how many of them are < GATE_LOW

    @staticmethod
    def from_decision(decision: RoutingDecision, num_experts: int, dropped: torch.Tensor) -> "LayerStats":
        """Slots whose id is >= ``num_experts`` are placeholders (expert choice's unchosen experts): they
        count in no load and no gate statistic."""
        ids = decision.expert_ids_TK.reshape(-1)
        chosen = ids < num_experts
        load_E = torch.zeros(num_experts, device=ids.device).scatter_add_(
            0, ids.clamp(max=num_experts - 1), chosen.float()
        )
        if decision.scores_TE is not None:
            p = decision.scores_TE.float().clamp_min(1e-20)
            entropy = -(p * p.log()).sum()
        else:
            entropy = torch.zeros((), device=ids.device)
        n = torch.full((), float(decision.expert_ids_TK.shape[0]), device=ids.device)  # no host->device copy
        gates = decision.gates_TK.detach().float().reshape(-1)
        return LayerStats(
            load_E,
            dropped.float(),
            entropy,
            n,
            dict(decision.aux_terms),
            gate_sum=(gates * chosen).sum(),
            gate_low=((gates < GATE_LOW) & chosen).sum().float(),
        )


class MoEMetrics:
    """Accumulates per-layer stats over micro-steps; ``flush`` returns flat metric names -> floats."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self._sums: list[dict[str, torch.Tensor]] = []
        self._count = 0

    def add(self, stats: list[LayerStats]) -> None:
        if not self._sums:
            self._sums = [{} for _ in stats]
        for acc, s in zip(self._sums, stats):
            items = {"load": s.load_E, "dropped": s.dropped, "entropy": s.entropy_sum, "tokens": s.num_tokens}
            if s.gate_sum is not None:
                items.update({"gate_sum": s.gate_sum, "gate_low": s.gate_low})
            items.update({f"aux/{k}": v.float() for k, v in s.aux_terms.items()})
            for key, value in items.items():
                acc[key] = acc[key] + value.detach() if key in acc else value.detach().clone()
        self._count += 1

    def flush(self) -> dict[str, float]:
        if not self._sums:
            return {}
        out: dict[str, float] = {}
        world = dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1
        for i, acc in enumerate(self._sums):
            keys = sorted(acc)
            flat = torch.cat([acc[k].reshape(-1).float() for k in keys])
            if world > 1:
                dist.all_reduce(flat, group=self.group)
            vals, offset = {}, 0
            for k in keys:
                n = acc[k].numel()
                vals[k] = flat[offset : offset + n]
                offset += n
            load = vals["load"] / self._count  # tokens per expert per micro-step, summed over ranks
            slots = load.sum().clamp_min(1.0)
            p = f"moe/layer{i}/"
            out[p + "load_min"] = load.min().item()
            out[p + "load_max"] = load.max().item()
            out[p + "load_std"] = load.std(unbiased=False).item()
            out[p + "load_max_over_mean"] = (load.max() / load.mean().clamp_min(1e-9)).item()
            out[p + "dropped_frac"] = (vals["dropped"].sum() / self._count / slots).item()
            out[p + "router_entropy"] = (vals["entropy"].sum() / vals["tokens"].sum().clamp_min(1.0)).item()
            if "gate_sum" in vals:
                pairs = vals["load"].sum().clamp_min(1.0)  # every (token, slot) pair has one gate
                out[p + "gate_mean"] = (vals["gate_sum"].sum() / pairs).item()
                out[p + "gate_low_frac"] = (vals["gate_low"].sum() / pairs).item()
            for k in keys:
                if k.startswith("aux/") and vals[k].numel() > 1:  # a per-expert load: summed over the interval
                    out[p + k[4:] + "_max_over_mean"] = max_over_mean(vals[k])
                elif k.startswith("aux/"):
                    out[p + k[4:]] = (vals[k].sum() / (self._count * world)).item()
            out[p + "load"] = [round(x, 3) for x in load.tolist()]
        self._sums, self._count = [], 0
        return out


def max_over_mean(load_E: torch.Tensor) -> float:
    """Busiest expert's load over the mean load (1 = perfectly balanced, E = everything on one expert)."""
    return (load_E.max() / load_E.float().mean().clamp_min(1e-9)).item()
