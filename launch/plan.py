"""A launch, as data: the files to write and the command to run, and what ``--dry-run`` prints."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moetrain.config.job import JobConfig

TRAIN_MODULE = "moetrain.cli"  # workers run `python -m moetrain.cli train CONFIG [overrides]`


@dataclass(frozen=True)
class Job:
    """One ``moetrain launch`` request, resolved: the validated config and where things live."""

    cfg: JobConfig
    config_path: str  # as given on the command line; workers of local launches read it
    overrides: list[str]  # the user's key.path=value items, passed on to local workers
    python: str  # launch.python, or the interpreter running `moetrain launch`
    run_dir: Path  # absolute
    workdir: Path  # absolute: where the job runs (relative paths in the config start here)

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass(frozen=True)
class LaunchPlan:
    """Write ``files``, then run ``command`` with ``env`` added to the environment."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)
    script: str | None = None  # the sbatch script, printed by --dry-run instead of the command
    first: list[str] | None = None  # SLURM: submitted before ``command``, which then waits for it (afterok)
    first_script: str | None = None

    def shell_line(self) -> str:
        """The command as one copy-pasteable shell line, environment first."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(assignments + [shlex.join(self.command)])

    def dry_run_text(self) -> str:
        if self.script is None:
            return self.shell_line() + "\n"
        if self.first_script is None:
            return self.script
        return self.first_script + "\n" + self.script


# The launchers run as modules of launch.python: they exist wherever torch and deepspeed import, also where
# their console scripts are not beside it (a venv with --system-site-packages, pip --user, conda base)
LAUNCHER_MODULES = {"torchrun": "torch.distributed.run", "deepspeed": "deepspeed.launcher.runner"}


def tool(python: str, name: str) -> list[str]:
    """``torchrun`` / ``deepspeed`` as ``python -m <module>`` of the job's interpreter.

    ``/opt/venv/bin/python`` -> ``/opt/venv/bin/python -m torch.distributed.run`` (what the ``torchrun``
    script runs); ``python`` -> ``python -m ...`` (found on the PATH of the job, e.g. after
    ``slurm.setup`` activated an environment).
    """
    return [python, "-m", LAUNCHER_MODULES[name]]


def prepare_args(config: str) -> list[str]:
    """What each data-preparation task runs after ``python -m`` (its source: the array task id)."""
    return [TRAIN_MODULE, "prepare", config, "--source"]


def train_args(config: str, overrides: list[str]) -> list[str]:
    """What every worker runs after ``python -m``: the config and overrides, less the launch.* ones."""
    kept = [o for o in overrides if not o.removeprefix("--").startswith("launch.")]
    return [TRAIN_MODULE, "train", config, *kept]
