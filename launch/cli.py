"""``moetrain launch CONFIG [overrides] --launcher torchrun|deepspeed|slurm [--dry-run] ...``.

``moetrain/cli.py`` calls :func:`add_launch_parser` to add the subcommand and :func:`run_launch` to
run it. Each flag is the override of one ``launch:`` field, so the YAML, ``key=value`` overrides and
flags meet in one validated config (flags win); user errors raise UserError (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moetrain.config.loading import load_config
from moetrain.errors import UserError
from moetrain.launch import local, preflight, slurm
from moetrain.launch.plan import Job, LaunchPlan


@dataclass(frozen=True)
class Flag:
    option: str
    path: str  # the launch field it overrides
    help: str
    kind: str = "str"  # str | int | bool
    metavar: str = "VALUE"

    @property
    def dest(self) -> str:
        return self.option.removeprefix("--").replace("-", "_")


FLAGS = [
    Flag("--launcher", "launch.launcher", "torchrun (default), deepspeed or slurm", metavar="NAME"),
    Flag("--nodes", "launch.nodes", "number of nodes", "int", "N"),
    Flag("--gpus-per-node", "launch.gpus_per_node", "one process per GPU", "int", "G"),
    Flag("--procs-per-node", "launch.procs_per_node", "processes per node (CPU)", "int", "P"),
    Flag("--master-addr", "launch.master_addr", "address of the first node", metavar="HOST"),
    Flag("--master-port", "launch.master_port", "port on the first node", "int", "PORT"),
    Flag("--rdzv-endpoint", "launch.rendezvous.endpoint", "torchrun: the c10d rendezvous", metavar="HOST:PORT"),
    Flag("--rdzv-id", "launch.rendezvous.id", "torchrun: rendezvous id shared by the nodes", metavar="ID"),
    Flag(
        "--max-restarts",
        "launch.max_restarts",
        "torchrun: restarts of the workers after a failure",
        "int",
        "N",
    ),
    Flag("--hostfile", "launch.hostfile", "deepspeed: hostfile of 'HOST slots=N' lines", metavar="FILE"),
    Flag("--include", "launch.include", "deepspeed: e.g. worker-0@worker-1:0,2", metavar="HOSTS"),
    Flag("--exclude", "launch.exclude", "deepspeed: e.g. worker-1:0", metavar="HOSTS"),
    Flag("--partition", "launch.slurm.partition", "SLURM partition", metavar="NAME"),
    Flag("--account", "launch.slurm.account", "SLURM account", metavar="NAME"),
    Flag("--time", "launch.slurm.time", "SLURM time limit, e.g. 04:00:00", metavar="LIMIT"),
    Flag("--job-name", "launch.slurm.job_name", "SLURM job name (default: the config's name)", metavar="NAME"),
    Flag(
        "--slurm-mode",
        "launch.slurm.mode",
        "torchrun (one task per node, default) or tasks (one per process)",
        metavar="MODE",
    ),
    Flag("--requeue", "launch.slurm.requeue", "SLURM: requeue before the time limit / on preemption", "bool"),
    Flag(
        "--prepare",
        "launch.slurm.prepare",
        "SLURM: prepare the data first, in an array job (one task per source)",
        "bool",
    ),
]
# A flag wins over the YAML's value of a field that cannot be set beside it.
CLEARS = {
    "--gpus-per-node": "launch.procs_per_node=null",
    "--procs-per-node": "launch.gpus_per_node=null",
    "--hostfile": "launch.hosts=[]",
    "--include": "launch.exclude=null",
    "--exclude": "launch.include=null",
}


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "launch",
        help="start a job with torchrun, the deepspeed launcher or SLURM (sbatch)",
        description="Check a job, then start it with torchrun or the deepspeed launcher, or submit it to "
        "SLURM. Each flag overrides one field of the config's launch: section. See docs/launching.md.",
    )
    p.add_argument("config", help="YAML job config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    p.add_argument("--dry-run", action="store_true", help="print the command (SLURM: the script); start nothing")
    for flag in FLAGS:
        if flag.kind == "bool":
            p.add_argument(flag.option, dest=flag.dest, action="store_true", default=None, help=flag.help)
        else:
            p.add_argument(flag.option, dest=flag.dest, default=None, metavar=flag.metavar, help=flag.help)
    return p


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``launch.*`` overrides (strings quoted so YAML keeps them strings)."""
    given = {flag.path: flag for flag in FLAGS if getattr(args, flag.dest, None) is not None}
    out = []
    for flag in given.values():
        value = getattr(args, flag.dest)
        clear = CLEARS.get(flag.option)
        if clear is not None:
            other = given.get(clear.partition("=")[0])
            if other is not None:
                raise UserError(f"{flag.option} and {other.option} are mutually exclusive; give one of them")
            out.append(clear)
        if flag.kind == "bool":
            out.append(f"{flag.path}=true")
        elif flag.kind == "int":
            out.append(f"{flag.path}={value}")
        else:
            out.append(f"{flag.path}={json.dumps(str(value))}")
    return out


def make_job(args: argparse.Namespace) -> Job:
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides + flag_overrides(args))
    return Job(
        cfg=cfg,
        config_path=args.config,
        overrides=overrides,
        python=cfg.launch.python or sys.executable,
        run_dir=Path(os.path.abspath(cfg.resolved_run_dir)),
        workdir=Path.cwd(),
    )


def _builders() -> dict[str, Callable[[Job], LaunchPlan]]:
    return {"torchrun": local.torchrun_plan, "deepspeed": local.deepspeed_plan, "slurm": slurm.slurm_plan}


def run_launch(args: argparse.Namespace) -> int:
    """Check the job, then start it (or print it with --dry-run); returns the exit code."""
    job = make_job(args)
    launcher = job.cfg.launch.launcher
    plan = preflight.run_all(job, _builders()[launcher], dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(plan.dry_run_text())
        note = "dry run: nothing written or started"
        if plan.files:
            note += f"; a launch writes {', '.join(str(p) for p in plan.files)}"
        if plan.script is not None:
            note += f" and runs: {plan.shell_line()}"
        print(note, file=sys.stderr)
        return 0
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if launcher == "slurm":
        return _submit(job, plan)
    return _run(plan)


def _submit(job: Job, plan: LaunchPlan) -> int:
    first, job_id = slurm.submit(plan)
    if first is not None:
        print(f"submitted data preparation array job {first}")
        print(f"  script: {slurm.prepare_script_path(job)}")
        print(f"  logs:   {job.run_dir}/prepare-{first}_<task>.out")
    print(f"submitted batch job {job_id}" + ("" if first is None else f" (starts after job {first} succeeds)"))
    print(f"  script: {slurm.script_path(job)}")
    print(f"  log:    {job.run_dir}/slurm-{job_id}.out")
    print(f"  watch:  squeue -j {job_id}    cancel: scancel {job_id}")
    return 0


def _run(plan: LaunchPlan) -> int:
    print(f"moetrain launch: {plan.shell_line()}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(plan.command, env={**os.environ, **plan.env})
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the launcher got the same Ctrl-C and stops its workers; let it finish
        code = proc.wait()
    return 128 - code if code < 0 else code
