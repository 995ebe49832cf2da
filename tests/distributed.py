"""One helper for multi-process tests without a launcher: ``run_distributed(fn, world_size, *args)``.

Each process joins a gloo process group (world = world_size) and calls ``fn(rank, world_size, *args)``;
an exception in any process fails the test with that process's traceback.
"""

from __future__ import annotations

import gc
import os
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port


def _entry(rank: int, world_size: int, port: int, fn, args, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        # NOTE: free what ``fn`` left in reference cycles first (a layer whose patched ``forward`` closes over
        # it holds its dispatcher, which holds the group): a gloo group still referenced is destroyed only at
        # interpreter finalization, where its worker threads may release tensors after Python is gone:
        # SIGABRT, "terminate called without an active exception" (pytorch/pytorch#179291). Seen once per
        # test in a fresh-clone suite run (tests/test_empty_work.py, both "nothing_at_all" cases).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    assert not bad, f"exit codes {bad}"


def tiny_ep_model(ep_size: int = 2, partition_weights: bool = False):
    """In a process of :func:`run_distributed`: DeepSpeed joined to its group, and the tiny MoE transformer
    (4 experts, d_model 16, seed 0) sharded over ``ep_size`` ranks and registered with DeepSpeed's MoE
    contract (``partition_weights``: the ZeRO-3 placement). Returns (model, layout)."""
    import deepspeed
    import torch

    from moetrain.config.model import ModelConfig, MoEConfig
    from moetrain.model import MoETransformer
    from moetrain.parallel import deepspeed_moe
    from moetrain.parallel.layout import ParallelLayout
    from moetrain.parallel.parallelize import parallelize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # joins this group
    layout = ParallelLayout.init(ep_size=ep_size)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8)
    model = parallelize(MoETransformer(cfg, MoEConfig(num_experts=4)), layout)
    deepspeed_moe.register_expert_parallel(model, layout, partition_weights=partition_weights)
    return model, layout


class ExchangeRecorder:
    """A :class:`moetrain.parallel.all_to_all.DispatchObserver` for tests: the token bytes of every
    forward exchange, in order (phases are not timed)."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def phase(self, name, device):
        import contextlib

        return contextlib.nullcontext()

    def exchanged(self, nbytes: int) -> None:
        self.sent.append(nbytes)
