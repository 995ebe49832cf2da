"""The run directory must be writable: checked first, before data, model or DeepSpeed setup."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moetrain.errors import UserError


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
