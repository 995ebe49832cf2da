"""Bytes and messages across the node boundary: the flat EP all-to-all vs ``moe.dispatch: hierarchical``.

Gloo ranks on this machine pretend to be ``--nodes`` nodes of ``--per-node`` ranks each (torchrun's
``GROUP_RANK``), one MoE layer (top-k softmax router, SwiGLU experts) sharded over one EP group of
all of them, one forward + backward on each dispatcher with the same weights and tokens. Every rank
counts, per exchange phase, the bytes and non-empty messages it sends within its node and across
nodes (``tests/traffic.py``'s ``Traffic``, a dispatch observer: exact, from the split sizes); the
table sums bytes over ranks and gives the most cross-node messages any rank sends per exchange.

Timing is not reported: all "nodes" share one host and gloo's loopback, so there is no slow link
for the hierarchical exchange to save on; what the exchange changes is measurable only in bytes
and messages (see moetrain/parallel/hierarchical.py for when that pays).

    python bench/ep_hierarchical.py                          # 2x2, 2x4 and 4x2 ranks
    python bench/ep_hierarchical.py --layouts 2x2 --top-k 2

Writes bench/results/ep_hierarchical.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import env_info, fmt_table, write_json  # noqa: E402
from moetrain.parallel.layout import free_port  # noqa: E402
from tests.traffic import Traffic  # noqa: E402 - a test utility, not in the package


def _rank(rank: int, world: int, per_node: int, port: int, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank % per_node), GROUP_RANK=str(rank // per_node),
    )  # fmt: skip
    torch.set_num_threads(1)
    from moetrain.config.model import MoEConfig
    from moetrain.moe.layer import MoELayer
    from moetrain.parallel.all_to_all import AllToAllDispatcher
    from moetrain.parallel.hierarchical import HierarchicalDispatcher
    from moetrain.parallel.layout import ParallelLayout

    layout = ParallelLayout.init(ep_size=world, hierarchical=True)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, expert_type="swiglu", router={"kind": "topk", "top_k": args.top_k})
    layer = MoELayer(cfg, args.d_model, args.hidden, 256)
    layer.experts.shard(layout.ep_rank, world)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.d_model, generator=gen)
    ids = torch.randint(0, 256, (args.tokens,), generator=gen)
    common = (args.experts, None, layer.backend, layout.ep_group, False)
    out = {}
    for name, dispatcher in (
        ("flat", AllToAllDispatcher(*common)),
        ("hierarchical", HierarchicalDispatcher(*common, topology=layout.topology)),
    ):
        traffic = dispatcher.observer = Traffic(layout.node_of)
        layer.dispatcher = dispatcher
        layer(x.clone().requires_grad_(True), ids).y_TD.sum().backward()
        out[name] = {f"{p}|{w}": (b, traffic.msgs[(p, w)]) for (p, w), b in traffic.sent.items()}
    queue.put(out)
    dist.destroy_process_group()


def measure(nodes: int, per_node: int, args) -> dict:
    world = nodes * per_node
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, per_node, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for kind in ("flat", "hierarchical"):
        rows: dict[str, dict[str, int]] = {}
        for rank_out in per_rank:
            for key, (b, msgs) in rank_out[kind].items():
                row = rows.setdefault(key, {"bytes": 0, "max_messages_per_rank": 0})
                row["bytes"] += b
                row["max_messages_per_rank"] = max(row["max_messages_per_rank"], msgs)
        summary[kind] = rows
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["2x2", "2x4", "4x2"], help="NODESxPER_NODE")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ep_hierarchical.json"))
    args = p.parse_args()
    results, table = {}, []
    for layout in args.layouts:
        nodes, per_node = map(int, layout.split("x"))
        res = measure(nodes, per_node, args)
        results[layout] = res
        for kind, rows in res.items():
            for key, row in sorted(rows.items()):
                phase, where = key.split("|")
                table.append([layout, kind, phase, where, f"{row['bytes'] / 2**20:.2f}", row["max_messages_per_rank"]])
    print(fmt_table(table, ["nodes x ranks", "exchange", "phase", "where", "MiB (all ranks)", "max messages / rank"]))
    write_json(args.out, {"env": env_info(torch.device("cpu")), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
