"""Two "nodes" on one machine: where the process groups lie, the hierarchical all-to-all, a two-agent run.

- placement: EP groups never span nodes unless expert_parallel_size exceeds (or does not divide) the
  processes per node, and then a warning says so; expert-data-parallel groups cross nodes;
- ``moe.dispatch: hierarchical`` (4 gloo ranks as 2 nodes x 2, EP 4) gives the flat exchange's outputs
  and gradients, and moves the same bytes across the node boundary in fewer messages;
- two torchrun agents (``--nnodes 2``, c10d rendezvous on localhost, 2 processes each) train with EP 2
  (groups inside each node) and with EP 4 hierarchical (groups across the nodes), each with the
  losses, grad-norms and final weights of one process on the same global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_CONFIG, clean_env, free_port
from distributed import run_distributed
from test_expert_parallel import COMMON, assert_same_run, single
from traffic import Traffic

from moetrain.parallel.placement import placement

PLACEMENTS = {
    # (processes per node, nodes, ep): EP groups stay inside nodes
    "2x2-ep2": ((0, 0, 1, 1), 2, None),
    "4x2-ep2": ((0, 0, 0, 0, 1, 1, 1, 1), 2, None),
    "4x2-ep4": ((0, 0, 0, 0, 1, 1, 1, 1), 4, None),
    "2x2-ep1": ((0, 0, 1, 1), 1, None),
    "2x1-ep2": ((0, 0), 2, None),
    # EP exceeds the processes per node
    "2x2-ep4": ((0, 0, 1, 1), 4, "exceeds the processes per node (2)"),
    "1x4-ep2": ((0, 1, 2, 3), 2, "exceeds the processes per node (1)"),
    # EP does not divide the processes per node
    "3x2-ep2": ((0, 0, 0, 1, 1, 1), 2, "does not divide the processes per node"),
    # ranks of a node numbered across nodes (cyclic)
    "cyclic-ep2": ((0, 1, 0, 1), 2, "non-consecutively"),
}


@pytest.mark.parametrize("case", list(PLACEMENTS))
def test_ep_groups_span_nodes_only_when_they_must_and_then_say_so(case):
    node_of, ep, why = PLACEMENTS[case]
    place = placement(node_of, ep)
    spanning = [g for g in place.ep_groups if place.spans(g)]
    if why is None:
        assert not spanning and place.warning is None
        if place.nodes > 1 and ep > 1 and len(node_of) > ep:
            assert all(place.spans(g) for g in place.expert_dp_groups)  # the gradient reductions cross
    else:
        assert spanning and why in place.warning and "moe.dispatch: hierarchical" in place.warning
    assert sorted(r for g in place.ep_groups for r in g) == list(range(len(node_of)))


def test_placement_line_names_nodes_and_groups():
    line = placement((0, 0, 1, 1), 2).describe()
    assert line == (
        "placement: 2 node(s) (node 0: ranks [0,1]; node 1: ranks [2,3]); expert-parallel groups [0,1] [2,3] "
        "(each inside a node); expert-data-parallel groups [0,2] [1,3] (across nodes)"
    )


def _hierarchical_equals_flat(rank: int, world: int, top_k: int) -> None:
    os.environ["GROUP_RANK"] = str(rank // 2)  # two "nodes" of two ranks each
    torch.set_num_threads(1)
    from moetrain.config.model import MoEConfig
    from moetrain.moe.layer import MoELayer
    from moetrain.parallel.all_to_all import AllToAllDispatcher
    from moetrain.parallel.hierarchical import HierarchicalDispatcher
    from moetrain.parallel.layout import ParallelLayout

    layout = ParallelLayout.init(ep_size=4, hierarchical=True)
    assert layout.node_of == (0, 0, 1, 1) and layout.topology is not None
    assert (layout.topology.nodes, layout.topology.per_node) == (2, 2)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, expert_type="swiglu", router={"kind": "topk", "top_k": top_k})
    layer = MoELayer(cfg, 16, 32, 64)
    layer.experts.shard(layout.ep_rank, 4)
    args = (8, None, layer.backend, layout.ep_group, False)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(48 if rank else 5, 16, generator=gen)  # uneven tokens per rank, one with few
    ids = torch.randint(0, 64, (x.shape[0],), generator=gen)
    out, grads = {}, {}
    for name, dispatcher in (
        ("flat", AllToAllDispatcher(*args)),
        ("hier", HierarchicalDispatcher(*args, topology=layout.topology)),
    ):
        dispatcher.observer = Traffic(layout.node_of[:4])
        layer.dispatcher = dispatcher
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi, ids).y_TD
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[name] = y.detach()
        grads[name] = [xi.grad] + [p.grad for p in layer.parameters()]
        out[name + "_traffic"] = dispatcher.observer
    assert torch.equal(out["flat"], out["hier"])
    for a, b in zip(grads["flat"], grads["hier"]):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    flat, hier = out["flat_traffic"], out["hier_traffic"]
    assert hier.exchanged_bytes == flat.exchanged_bytes > 0  # the same rows leave this rank either way
    assert hier.bytes("dispatch, within node", "across nodes") == 0  # phase 1 never leaves the node
    assert hier.bytes("dispatch, across nodes", "within node") == 0  # phase 2 only crosses
    # over all ranks, every row bound for the other node crosses once either way (a rank's own phase-2
    # share is its node's rows for its peer there, not its own rows)
    totals = torch.tensor(
        [
            hier.bytes(f"{d}, across nodes", "across nodes") - flat.bytes(d, "across nodes")
            for d in ("dispatch", "return")
        ]
    )
    torch.distributed.all_reduce(totals)
    assert totals.tolist() == [0, 0] and flat.bytes("dispatch", "across nodes") > 0
    assert hier.messages_sent("dispatch, across nodes", "across nodes") <= 1  # n - 1 = 1 peer across
    if rank:  # m * (n - 1) = 2 peers across for the ranks with 48 tokens; rank 0 has 5, maybe not one for each
        assert flat.messages_sent("dispatch", "across nodes") == 2


@pytest.mark.multiproc
@pytest.mark.timeout(180)
@pytest.mark.parametrize("top_k", [1, 2])
def test_hierarchical_all_to_all_equals_flat(top_k):
    run_distributed(_hierarchical_equals_flat, 4, top_k)


def two_agents(run_dir, data_cache, *overrides: str, timeout: int = 600) -> list[str]:
    """Two torchrun agents on localhost: --nnodes 2, two processes each, one c10d rendezvous."""
    port = free_port()
    args = ["train", str(TINY_CONFIG), *COMMON, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", *overrides]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=2",
                f"--node-rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=two-nodes-{port}",
                "-m",
                "moetrain.cli",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        for node in (0, 1)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_two_torchrun_agents_train_like_one_process(tmp_path, data_cache):
    """EP 2 inside each node; then EP 4 across both nodes with the hierarchical exchange."""
    single(tmp_path / "one", data_cache, 8, "moe.router.top_k=2")
    outs = two_agents(tmp_path / "ep2", data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=2",
                      "moe.router.top_k=2")  # fmt: skip
    text = "".join(outs)
    assert (
        "placement: 2 node(s) (node 0: ranks [0,1]; node 1: ranks [2,3]); expert-parallel groups [0,1] [2,3] "
        "(each inside a node); expert-data-parallel groups [0,2] [1,3] (across nodes)"
    ) in text
    assert text.count("placement:") == 1 and "warning: expert-parallel groups span nodes" not in text
    assert_same_run(tmp_path / "one", tmp_path / "ep2")

    outs = two_agents(tmp_path / "ep4", data_cache, "train.micro_batch_size=2", "moe.expert_parallel_size=4",
                      "moe.router.top_k=2", "moe.dispatch=hierarchical")  # fmt: skip
    text = "".join(outs)
    assert "warning: expert-parallel groups span nodes ([0-3]): moe.expert_parallel_size (4) exceeds" in text
    assert "moe.dispatch hierarchical: the token exchange is two-phase" in text
    assert_same_run(tmp_path / "one", tmp_path / "ep4")
