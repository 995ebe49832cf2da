"""Where the expert-parallel groups lie across nodes, from which node each rank runs on.

Expert-parallel (EP) groups are ``ep_size`` consecutive ranks (``layout.py``), and launchers number
the processes of one node consecutively (torchrun, the deepspeed launcher, SLURM's default block
distribution). So with P processes per node, EP groups stay inside a node whenever ep divides P:
the token all-to-alls, which run every MoE layer forward and backward, use the fast links within a
node, and only the expert-data-parallel gradient reductions (stride ep, once per step) cross nodes.

When ep exceeds P (or does not divide it, or a launcher numbers ranks across nodes) an EP group spans
nodes and every all-to-all crosses the node boundary; :func:`placement` then returns a warning saying
why and what to do (``moe.dispatch: hierarchical`` gathers a node's rows before they cross). Pure
functions of plain values, tested without processes (``tests/test_multinode.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


def _groups(world: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    ep_groups = [list(range(start, start + ep)) for start in range(0, world, ep)]
    dp_groups = [list(range(offset, world, ep)) for offset in range(ep)]
    return ep_groups, dp_groups


@dataclass(frozen=True)
class Placement:
    node_of: tuple[int, ...]  # node index of every rank
    ep_groups: list[list[int]]
    expert_dp_groups: list[list[int]]
    warning: str | None

    @property
    def nodes(self) -> int:
        return len(set(self.node_of))

    def spans(self, group: list[int]) -> bool:
        return len({self.node_of[r] for r in group}) > 1

    def describe(self) -> str:
        """One line for the start of a run (rank 0 prints it)."""
        per_node = {n: [r for r, m in enumerate(self.node_of) if m == n] for n in sorted(set(self.node_of))}
        nodes = "; ".join(f"node {n}: ranks {_span(rs)}" for n, rs in per_node.items())
        ep_where = "across nodes" if any(self.spans(g) for g in self.ep_groups) else "each inside a node"
        dp_where = "across nodes" if any(self.spans(g) for g in self.expert_dp_groups) else "inside a node"
        return (
            f"placement: {len(per_node)} node(s) ({nodes}); expert-parallel groups "
            f"{' '.join(_span(g) for g in self.ep_groups)} ({ep_where}); expert-data-parallel groups "
            f"{' '.join(_span(g) for g in self.expert_dp_groups)} ({dp_where})"
        )


def _span(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"[{ranks[0]}-{ranks[-1]}]"
    return "[" + ",".join(map(str, ranks)) + "]"


def placement(node_of: list[int] | tuple[int, ...], ep_size: int) -> Placement:
    """The EP and expert-DP groups of ``len(node_of)`` ranks and whether an EP group spans nodes."""
    world = len(node_of)
    ep_groups, dp_groups = _groups(world, ep_size)
    counts = {n: sum(1 for m in node_of if m == n) for n in set(node_of)}
    per_node = min(counts.values())
    spanning = [g for g in ep_groups if len({node_of[r] for r in g}) > 1]
    warning = None
    if spanning:
        if ep_size > per_node:
            why = f"moe.expert_parallel_size ({ep_size}) exceeds the processes per node ({per_node})"
        elif any(c % ep_size for c in counts.values()):
            why = f"moe.expert_parallel_size ({ep_size}) does not divide the processes per node ({sorted(counts.values())})"
        else:
            why = "the launcher numbered the ranks of a node non-consecutively (use SLURM's block distribution)"
        warning = (
            f"warning: expert-parallel groups span nodes ({' '.join(_span(g) for g in spanning)}): {why}; every "
            "token all-to-all crosses the node boundary. Use an expert_parallel_size that divides the processes "
            "per node, or moe.dispatch: hierarchical to gather each node's rows before they cross"
        )
    return Placement(tuple(node_of), ep_groups, dp_groups, warning)
