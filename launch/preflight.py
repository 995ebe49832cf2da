"""Pre-flight: everything that can be checked before a process starts or a job is queued.

Each check raises one :class:`~moetrain.errors.UserError` naming the setting, its value and the fix.
The config itself was validated when it was loaded; here come the launch settings, the parallel
layout for the world size they give, the data, the run directory and the launcher's tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from moetrain.config.launch import LaunchConfig
from moetrain.errors import UserError
from moetrain.launch import hostfile, slurm
from moetrain.launch.plan import LAUNCHER_MODULES, Job, LaunchPlan


def world_size(job: Job) -> int:
    """The number of processes the launch starts (deepspeed: from its hostfile and filters)."""
    launch = job.cfg.launch
    if launch.launcher != "deepspeed":
        return (launch.nodes or 1) * launch.procs
    return sum(len(slots) for slots in deepspeed_slots(launch).values())


def deepspeed_slots(launch: LaunchConfig) -> dict[str, list[int]]:
    """The deepspeed launcher's ``{host: [slot, ...]}`` for these settings."""
    explicit_procs = launch.procs_per_node or launch.gpus_per_node
    if launch.hosts:
        if len(set(launch.hosts)) != len(launch.hosts):
            raise UserError(f"launch.hosts lists a host twice: {launch.hosts}")
        pool = {host: launch.procs for host in launch.hosts}
    elif launch.hostfile:
        path = Path(launch.hostfile)
        if not path.is_file():
            raise UserError(f"launch.hostfile: {str(path)!r} does not exist; give a file of 'HOST slots=N' lines")
        pool = hostfile.parse_hostfile(path.read_text(encoding="utf-8"), f"launch.hostfile {str(path)!r}")
    else:
        if (launch.nodes or 1) > 1:
            raise UserError(
                f"a multi-node deepspeed launch (launch.nodes={launch.nodes}) needs the hosts: "
                "set launch.hosts (a hostfile is generated) or launch.hostfile"
            )
        return hostfile.resolve({"localhost": launch.procs}, launch.include, launch.exclude, None, None)
    return hostfile.resolve(pool, launch.include, launch.exclude, launch.nodes, explicit_procs)


def check_layout(job: Job) -> int:
    """The parallel layout must fit the world size the launch gives; returns that size."""
    launch = job.cfg.launch
    world = world_size(job)
    try:
        job.cfg.check_world_size(world)
    except UserError as exc:
        if launch.launcher == "deepspeed" and (launch.hosts or launch.hostfile or launch.include or launch.exclude):
            where = "the deepspeed hosts and filters give"
        else:
            where = f"launch.nodes ({launch.nodes or 1}) x {launch.procs} processes per node ="
        raise UserError(f"{where} world size {world}: {exc}") from None
    return world


def check_settings(job: Job) -> None:
    """Launch settings that cannot work together."""
    launch, cfg = job.cfg.launch, job.cfg
    uses_torchrun = launch.launcher == "torchrun" or (launch.launcher == "slurm" and launch.slurm.mode == "torchrun")
    if launch.max_restarts and not uses_torchrun:
        mode = " with launch.slurm.mode=tasks" if launch.launcher == "slurm" else ""
        raise UserError(
            f"launch.max_restarts ({launch.max_restarts}) restarts torchrun's workers, but launcher "
            f"{launch.launcher}{mode} starts no torchrun; use --launcher torchrun, slurm.mode=torchrun, "
            "or launch.slurm.requeue"
        )
    if launch.launcher == "slurm" and launch.slurm.requeue and cfg.checkpoint.resume != "auto":
        raise UserError(
            f"launch.slurm.requeue needs checkpoint.resume: auto (got {cfg.checkpoint.resume!r}), so that a "
            "requeued job resumes from its latest checkpoint instead of starting over"
        )


def check_run_dir(run_dir: Path, create: bool) -> None:
    """The run directory must be writable; ``create`` makes it and writes a probe file."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"run_dir: {str(run_dir)!r} cannot be created, {str(probe)!r} is a file; set run_dir")
    fix = "set run_dir (or name) to a folder you can write"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"run_dir: {str(run_dir)!r} is not writable ({str(probe)!r} is read-only to you); {fix}")
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as exc:
            raise UserError(f"run_dir: cannot write to {str(run_dir)!r} ({exc.strerror}); {fix}") from None


def check_tools(job: Job, plan: LaunchPlan) -> None:
    """launch.python exists here and finds the launcher's package (not checked by --dry-run)."""
    launch = job.cfg.launch
    if launch.launcher == "slurm":
        if shutil.which("sbatch") is None:
            raise UserError(
                "sbatch not found on PATH: --launcher slurm submits from a SLURM login node "
                "(--dry-run prints the script anywhere)"
            )
        return
    exe = job.python  # the launcher runs as its module (plan.tool)
    found = os.access(exe, os.X_OK) if os.path.dirname(exe) else shutil.which(exe) is not None
    if not found:
        raise UserError(
            f"launch.python: {exe} not found; set launch.python to the interpreter of the job's environment"
        )
    module = LAUNCHER_MODULES[launch.launcher]
    package = module.split(".")[0]  # found without importing it (torch takes seconds)
    probe = subprocess.run(
        [exe, "-c", f"import importlib.util as u; exit(u.find_spec({package!r}) is None)"], capture_output=True
    )
    if probe.returncode != 0:
        raise UserError(
            f"launch.python ({exe}) cannot import {package}, which runs the {launch.launcher} launcher "
            f"(python -m {module}); install {package} in that environment or set launch.python"
        )
    multi_node = launch.launcher == "deepspeed" and len(deepspeed_slots(launch)) > 1
    if multi_node and shutil.which("pdsh") is None:
        raise UserError(
            "a multi-node deepspeed launch runs its nodes through pdsh, which is not on PATH; install pdsh "
            "(and passwordless ssh to every host) or use --launcher slurm"
        )


def check_partition(job: Job) -> None:
    """Where ``sinfo`` answers: the partition exists, or the cluster has a default one."""
    if job.cfg.launch.launcher != "slurm":
        return
    found = slurm.cluster_partitions()
    if found is None:
        return
    names, default = found
    partition = job.cfg.launch.slurm.partition
    listing = ", ".join(f"{n} (default)" if n == default else n for n in names)
    if partition is None and default is None:
        raise UserError(
            f"launch.slurm.partition is required: this cluster has no default partition; use --partition "
            f"or launch.slurm.partition with one of: {listing}"
        )
    if partition is not None and partition not in names:
        raise UserError(f"launch.slurm.partition {partition!r} does not exist on this cluster; partitions: {listing}")


def run_all(job: Job, build_plan: Callable[[Job], LaunchPlan], *, dry_run: bool) -> LaunchPlan:
    """Every check, in the order a user would fix them; returns the plan that passed them."""
    from moetrain.data import check_data_reachable

    check_settings(job)
    plan = build_plan(job)  # raises for settings a launcher cannot express (multi-node without an address)
    check_layout(job)
    if job.cfg.launch.check_data:  # false: the data lives only on the compute nodes (docs/launching.md)
        check_data_reachable(job.cfg.data)
    check_partition(job)
    if not dry_run:
        check_tools(job, plan)
    check_run_dir(job.run_dir, create=not dry_run)  # last: a rejected launch leaves no folder behind
    return plan
