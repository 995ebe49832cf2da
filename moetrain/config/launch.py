"""The ``launch:`` section of a job config: how ``moetrain launch`` starts the job.

Every field can also be given as an override (``launch.slurm.partition=gpu``) and the common ones as
CLI flags (``--nodes 2``), which win over the YAML. Settings that belong to another launcher are
ignored, so one YAML can be launched with torchrun on a workstation and with SLURM on a cluster.
This module imports no torch: it is part of the config tree that ``moetrain validate`` loads.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moetrain.config.schema import StrictModel

Launcher = Literal["torchrun", "deepspeed", "slurm"]
SlurmMode = Literal["torchrun", "tasks"]

DEFAULT_PORT = 29500
# SLURM --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
_SLURM_TIME = re.compile(
    r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2}|UNLIMITED|INFINITE)$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RendezvousConfig(StrictModel):
    """torchrun's c10d rendezvous, used by multi-node jobs (``--rdzv-endpoint``, ``--rdzv-id``)."""

    endpoint: str | None = Field(
        None,
        description="host[:port] every node can reach; default master_addr:master_port (SLURM: the head node)",
    )
    id: str | None = Field(None, description="shared by all nodes of one job; default the job name (SLURM: job id)")


class SlurmConfig(StrictModel):
    """The sbatch script ``moetrain launch --launcher slurm`` writes into the run directory."""

    mode: SlurmMode = Field(
        "torchrun",
        description="torchrun: one task per node runs `srun torchrun`; "
        "tasks: one task per process, ranks from SLURM_PROCID / SLURM_LOCALID",
    )
    partition: str | None = Field(None, description="required where the cluster has no default partition")
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(None, description="time limit, e.g. 04:00:00 or 2-00:00:00")
    job_name: str | None = Field(None, description="default: the job's name")
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = Field(None, description="memory per node, e.g. 64G")
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH options, e.g. --exclusive")
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run before the launch: module load, source venv/bin/activate, container setup",
    )
    srun_args: list[str] = Field(default_factory=list, description="more srun options, e.g. --container-image=...")
    requeue: bool = Field(
        False, description="requeue on preemption and before the time limit; resumes from a checkpoint"
    )
    signal_seconds: int = Field(
        120, ge=10, description="with requeue: SLURM signals the job this many seconds before the time limit"
    )
    prepare: bool = Field(
        False,
        description="first submit `moetrain prepare` as an array job (one task per data source, no GPUs); "
        "training starts when every task succeeded (--dependency=afterok)",
    )

    @field_validator("time")
    @classmethod
    def _time_format(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_TIME.match(value):
            raise ValueError(f"{value!r} is not a SLURM time limit; use MM, HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)")
        return value

    @field_validator("mem")
    @classmethod
    def _mem_format(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^\d+[KMGT]?$", value):
            raise ValueError(f"{value!r} is not a SLURM memory size; use e.g. 64G or 500M")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _sbatch_options(cls, lines: list[str]) -> list[str]:
        """Accept ``--exclusive`` or ``#SBATCH --exclusive``; store the option alone."""
        out = []
        for line in lines:
            option = line.strip().removeprefix("#SBATCH").strip()
            if not option.startswith("-"):
                raise ValueError(f"{line!r} is not an sbatch option; write it as e.g. --exclusive or --qos=high")
            out.append(option)
        return out


class LaunchConfig(StrictModel):
    """Where and how many processes run. World size = nodes x processes per node."""

    launcher: Launcher = "torchrun"
    nodes: int | None = Field(None, ge=1, description="default 1 (deepspeed: every host of the hostfile)")
    procs_per_node: int | None = Field(None, ge=1, description="processes per node (CPU); default 1")
    gpus_per_node: int | None = Field(
        None, ge=1, description="one process per GPU; SLURM also requests the GPUs (--gpus-per-node)"
    )
    master_addr: str | None = Field(None, description="address of the first node (multi-node torchrun / deepspeed)")
    master_port: int | None = Field(None, ge=1, le=65535, description="default 29500 (SLURM: derived from the job id)")
    rendezvous: RendezvousConfig = RendezvousConfig()
    max_restarts: int = Field(0, ge=0, description="torchrun --max-restarts: restart all workers after a failure")
    hosts: list[str] = Field(default_factory=list, description="deepspeed: hosts of a generated hostfile")
    hostfile: str | None = Field(None, description="deepspeed: an existing hostfile (`host slots=N` lines)")
    include: str | None = Field(None, description="deepspeed --include, e.g. worker-0@worker-1:0,2")
    exclude: str | None = Field(None, description="deepspeed --exclude, e.g. worker-1:0")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for every process")
    check_data: bool = Field(
        True,
        description="check before launching that the data (data.paths / data.sources) can be read from this host; "
        "false for data mounted only on the compute nodes (the job itself still checks it, on rank 0, at start)",
    )
    python: str | None = Field(
        None,
        description="the job's Python; torchrun and the deepspeed launcher run as its modules (python -m). "
        "Default: the Python running `moetrain launch`; write `python` when slurm.setup activates the environment",
    )
    slurm: SlurmConfig = SlurmConfig()

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, env: Any) -> Any:
        """YAML reads ``OMP_NUM_THREADS: 4`` as a number; the environment holds strings."""
        if not isinstance(env, dict):
            return env
        for key in env:
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return {
            k: str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, int | float) else v
            for k, v in env.items()
        }

    @model_validator(mode="after")
    def _exclusive(self) -> "LaunchConfig":
        pairs = [("procs_per_node", "gpus_per_node"), ("include", "exclude"), ("hosts", "hostfile")]
        for a, b in pairs:
            if getattr(self, a) and getattr(self, b):
                raise ValueError(f"{a} and {b} are mutually exclusive; set one of them")
        return self

    @property
    def procs(self) -> int:
        """Processes per node: the GPUs or CPU processes asked for, 1 by default."""
        return self.gpus_per_node or self.procs_per_node or 1
