"""The run directory must be one folder for every rank (checkpoints are written into it by all ranks):
checked at start with a file rank 0 writes and every rank reads back; a node-local disk fails the job on
every rank, naming the path, and leaves nothing behind."""

from __future__ import annotations

import pytest
from distributed import run_distributed

from moetrain.errors import UserError
from moetrain.training.run_dir import check_run_dir_shared


def _check(rank: int, world: int, base: str, shared: bool) -> None:
    from pathlib import Path

    # a node-local disk: every rank has "the same" path, but sees its own folder
    folder = Path(base) / ("shared" if shared else f"node{rank}") / "run"
    folder.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        check_run_dir_shared(folder, rank, world)
    else:
        with pytest.raises(UserError, match="is not one folder for every rank") as err:
            check_run_dir_shared(folder, rank, world)
        assert "shared" not in str(err.value) or "filesystem every node mounts" in str(err.value)
    assert not [p for p in Path(base).rglob(".moetrain-shared-probe-*")]  # nothing left behind
    assert not folder.exists()  # the run directory is not created by the check


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared", [True, False])
def test_a_run_dir_every_rank_sees_passes_and_a_node_local_one_fails_on_every_rank(tmp_path, shared):
    run_distributed(_check, 2, str(tmp_path), shared)
