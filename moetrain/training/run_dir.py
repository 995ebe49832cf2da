"""The run directory must be writable, and the same folder for every rank: checked first, before data,
model or DeepSpeed setup."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moetrain.errors import UserError


def _nearest_existing(path: Path) -> Path:
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_run_dir_shared(path: Path, rank: int, world_size: int) -> None:
    """Every rank must see the run directory rank 0 sees: checkpoints are written into a temporary folder
    that rank 0 creates and every rank fills. Rank 0 writes a file with a random name and content where
    the run directory is (or will be created); every rank reads it back; anyone who cannot, fails the job
    on every rank with the path named. Collective; nothing is left behind."""
    if world_size == 1:
        return
    from moetrain.parallel.collectives import any_rank, barrier, broadcast_object

    nonce = os.urandom(16).hex()
    probe = _nearest_existing(path) / f".moetrain-shared-probe-{nonce}"
    if rank == 0:
        probe.write_text(nonce)
    # each rank looks where *it* sees the run directory (on a node-local disk that is another folder)
    name, nonce = broadcast_object((probe.name, nonce) if rank == 0 else None)
    probe = _nearest_existing(path) / name
    try:
        seen = probe.read_text() == nonce if rank != 0 else True
    except OSError:
        seen = False
    import torch

    missing = any_rank(torch.tensor(not seen))
    barrier()  # every rank has read the probe
    if rank == 0:
        probe.unlink(missing_ok=True)
    barrier()  # the probe is gone on every rank's return, not only on rank 0's
    if missing:
        raise UserError(
            f"run_dir {str(path)!r} is not one folder for every rank: a file rank 0 wrote in {str(probe.parent)!r} "
            "is not visible to every rank (a node-local disk?); checkpoints are written there by all ranks, so put "
            "run_dir on a filesystem every node mounts (docs/launching.md)"
        )


def check_run_dir_writable(path: Path) -> None:
    """Raise UserError naming ``path`` unless the run can create files in it; leave nothing behind.

    A missing ``path`` is not created (a run that fails later must not leave an empty run directory):
    the probe goes into its nearest existing ancestor, where ``mkdir`` will create it. The probe file
    has a unique name, so every rank of a job can check the same folder at once.
    """
    folder = path
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():  # a dangling link: mkdir would fail on it
            _refuse(path, f"{str(folder)!r} is a symbolic link to a missing target")
        folder = folder.parent
    if not folder.is_dir():
        where = "it is" if folder == path else f"{str(folder)!r} is"
        _refuse(path, f"{where} a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moetrain-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if folder == path else f" (it would be created in {str(folder)!r})"
        _refuse(path, f"cannot create files in it{where}: {exc.strerror}")


def _refuse(path: Path, why: str) -> None:
    raise UserError(f"run_dir {str(path)!r} is not writable: {why}; set run_dir to a folder this job can write")
