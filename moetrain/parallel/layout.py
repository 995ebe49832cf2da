"""The one parallel-layout object: degrees -> process groups.

World = data-parallel ranks. Experts are sharded over expert-parallel (EP) groups of ``ep_size``
consecutive ranks (E/ep experts each); the expert-data-parallel group joins the ranks that hold the
same experts (size world/ep, stride ep). This module and ``cli.py`` are the only places that read the
launcher's environment.

The job config checks a layout against a world size (``moetrain.config.check_world_size``) before
any process group exists; :meth:`ParallelLayout.init` only asserts it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moetrain.parallel.collectives import comm_device, force_collectives
from moetrain.parallel.placement import Placement, placement


def free_port() -> int:
    """A free TCP port on the loopback interface (for a lone process's own process group, and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a launcher sets for each process; a child that starts a job of its own must not inherit them.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_node() -> str:
    """This process's node, as the launcher names it: the host plus torchrun's GROUP_RANK, SLURM's
    SLURM_NODEID or the deepspeed launcher's CROSS_RANK (several "nodes" may share one host, as in the
    two-agent test; the host alone tells machines apart)."""
    env = os.environ
    node = env.get("GROUP_RANK", env.get("SLURM_NODEID", env.get("CROSS_RANK", "")))
    return f"{socket.gethostname()}/{node}"


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / deepspeed launcher / srun variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


@dataclass
class ParallelLayout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep_size: int = 1
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)
    expert_dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # MOETRAIN_FORCE_COLLECTIVES=1: the all-to-all dispatcher and every collective even at EP 1 / world 1
    # (a one-GPU run exercises the multi-GPU code paths; scripts/gpu_check.py)
    force_all_to_all: bool = False
    node_of: tuple[int, ...] = (0,)  # node index of every rank (the order nodes first appear in)
    topology: object = field(default=None, repr=False)  # moe.dispatch hierarchical: hierarchical.Topology

    @property
    def placement(self) -> Placement:
        return placement(self.node_of, self.ep_size)

    @property
    def ep_ranks(self) -> list[int]:
        start = self.rank - self.rank % self.ep_size
        return list(range(start, start + self.ep_size))

    @property
    def expert_dp_ranks(self) -> list[int]:
        return list(range(self.rank % self.ep_size, self.world_size, self.ep_size))

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def expert_dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def stats_group(self) -> dist.ProcessGroup | None:
        """The group routing statistics are reduced over: every data-parallel rank (None alone)."""
        return dist.group.WORLD if self.world_size > 1 else None

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def comm_device(self) -> torch.device:
        """Where the world group's collectives want their tensors (``moetrain.parallel.collectives``)."""
        return comm_device()

    @classmethod
    def init(cls, ep_size: int = 1, timeout_s: int = 600, hierarchical: bool = False) -> "ParallelLayout":
        """Initialise torch.distributed (gloo on CPU, NCCL on CUDA) from the environment and build groups.

        ``timeout_s`` (``train.collective_timeout_s``) bounds how long a collective on any of these groups
        waits for a stuck rank before it raises, which ends the job instead of hanging it. Every rank
        learns every rank's node (one all-gather; ``moetrain/parallel/placement.py``). ``hierarchical``
        (``moe.dispatch``): also the groups of the two-phase all-to-all, where EP groups span nodes.
        """
        rank, world, local_rank = env_rank_world()
        timeout = datetime.timedelta(seconds=timeout_s)
        if world % ep_size:
            raise ValueError(f"world size {world} is not a multiple of ep_size {ep_size} (check_world_size first)")
        import deepspeed

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            skip_shared_memory_comm_build()
            if world == 1:
                # NOTE: one process needs no rendezvous: an in-process store, not a TCP port (a lone job used to
                # pick a free port and bind it seconds later, and another process could take it in between:
                # EADDRINUSE). DeepSpeed adopts the initialised group.
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
        force = os.environ.get("MOETRAIN_FORCE_COLLECTIVES") == "1"
        force_collectives(force)
        layout = cls(rank, world, local_rank, ep_size, force_all_to_all=force, node_of=_node_of_every_rank(world))
        # NOTE: every rank must create every group, in the same order, even those it is not in.
        for start in range(0, world, ep_size):
            group = dist.new_group(list(range(start, start + ep_size)), timeout=timeout)
            if start <= rank < start + ep_size:
                layout.ep_group = group
        for offset in range(ep_size):
            group = dist.new_group(list(range(offset, world, ep_size)), timeout=timeout)
            if rank % ep_size == offset:
                layout.expert_dp_group = group
        # NOTE: DeepSpeed all-reduces dense gradients over its own clone of the world group, which it
        # would create lazily with dist.new_group and no timeout (torch's default: 30 min on gloo), so
        # a stuck rank would hang the job for that long. Creating the clone here gives it the timeout.
        from deepspeed.utils import groups as ds_groups

        if ds_groups._WORLD_GROUP is None:
            ds_groups._WORLD_GROUP = dist.new_group(list(range(world)), timeout=timeout)
        if hierarchical:
            layout.topology = _hierarchical_groups(layout, timeout)
        return layout


def skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed's comm backend from JIT-compiling its shared-memory all-reduce when it starts.

    On the CPU, DeepSpeed builds a C++ extension (``deepspeed_shm_comm``) at every ``init_distributed``
    for its *inference* all-reduce, which moetrain never calls. The first start in an environment compiles
    it (a minute on 2 cores) while every other process waits on a file lock, and a process killed while
    compiling leaves the lock behind, so every later start waits forever (seen here). moetrain's
    collectives are torch.distributed's own. ``tests/test_deepspeed_contract.py`` fails when DeepSpeed
    renames the function."""
    import importlib

    # NOTE: not ``import deepspeed.comm.torch``: deepspeed.comm's own ``torch`` attribute (the torch module)
    # shadows the submodule of that name
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    ds_torch.build_shm_op = lambda: None


def _node_of_every_rank(world: int) -> tuple[int, ...]:
    names: list[str | None] = [None] * world
    if world > 1:
        dist.all_gather_object(names, env_node())
    else:
        names = [env_node()]
    first: dict[str, int] = {}
    return tuple(first.setdefault(n, len(first)) for n in names)


def _hierarchical_groups(layout: "ParallelLayout", timeout: datetime.timedelta):
    """The two-phase all-to-all's groups (``moetrain/parallel/hierarchical.py``), for EP groups that
    span nodes with the same number of their ranks on each; None where an EP group lies in one node
    (the flat exchange never leaves it) or is uneven across nodes."""
    from moetrain.parallel.hierarchical import Topology

    place = layout.placement
    mine = None
    for group in place.ep_groups:  # NOTE: every rank creates every group, in the same order
        nodes = list(dict.fromkeys(place.node_of[r] for r in group))  # in the order they appear
        by_node = [[r for r in group if place.node_of[r] == n] for n in nodes]
        m = len(by_node[0])
        if len(nodes) == 1 or any(len(b) != m for b in by_node) or sum(by_node, []) != group:
            continue
        node_groups = [dist.new_group(b, timeout=timeout) for b in by_node]
        cross_groups = [dist.new_group([b[t] for b in by_node], timeout=timeout) for t in range(m)]
        if layout.rank in group:
            a, t = divmod(group.index(layout.rank), m)
            mine = Topology(len(nodes), m, node_groups[a], cross_groups[t])
    return mine
