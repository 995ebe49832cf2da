"""SLURM: render the sbatch script from ``templates/sbatch.sh``, and submit it.

Two layouts (``launch.slurm.mode``):

- ``torchrun`` (default): one task per node runs ``srun torchrun`` with a c10d rendezvous on the
  first node of the allocation (``scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1``);
  torchrun starts the processes of its node and can restart them (``launch.max_restarts``).
- ``tasks``: one SLURM task per process; ``moetrain train`` reads its rank from SLURM_PROCID,
  the world size from SLURM_NTASKS and the local rank from SLURM_LOCALID, and meets the others at
  MASTER_ADDR:MASTER_PORT, which the script exports.

With ``launch.slurm.prepare`` the data is prepared first by a separate array job (``prepare.sbatch``,
one task per data source, each ``moetrain prepare JOB_YAML --source $SLURM_ARRAY_TASK_ID``), and the
training job is submitted with ``--dependency=afterok:<its id>``: it starts only when every source's
store is published, and is cancelled by SLURM if a task fails.

With ``launch.slurm.requeue`` the job asks SLURM for USR1 ``signal_seconds`` before its time limit
(``--signal=B:USR1@N``), requeues itself when it arrives, and is requeued on preemption
(``--requeue``); each run resumes from the latest checkpoint (``checkpoint.resume: auto``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from moetrain.config.loading import dump_config
from moetrain.errors import UserError
from moetrain.launch.plan import Job, LaunchPlan, prepare_args, tool, train_args

# Below the Linux ephemeral range (32768+), different for concurrent jobs on one node.
DERIVED_PORT = "$((10000 + SLURM_JOB_ID % 20000))"
_SLOT = re.compile(r"\{\{(\w+)\}\}")


def script_path(job: Job) -> Path:
    return job.run_dir / "job.sbatch"


def job_config_path(job: Job) -> Path:
    return job.run_dir / "job.yaml"


def prepare_script_path(job: Job) -> Path:
    return job.run_dir / "prepare.sbatch"


def slurm_plan(job: Job) -> LaunchPlan:
    """Write the resolved config and the script into the run dir, then ``sbatch --parsable`` it (after
    the preparation array job, with ``launch.slurm.prepare``)."""
    frozen = job.cfg.model_copy(update={"run_dir": str(job.run_dir)})
    script = render_sbatch(job)
    files = {job_config_path(job): dump_config(frozen), script_path(job): script}
    command = ["sbatch", "--parsable", str(script_path(job))]
    if not job.cfg.launch.slurm.prepare:
        return LaunchPlan(command=command, files=files, script=script)
    first_script = render_prepare(job)
    files[prepare_script_path(job)] = first_script
    first = ["sbatch", "--parsable", str(prepare_script_path(job))]
    return LaunchPlan(command=command, files=files, script=script, first=first, first_script=first_script)


def render_prepare(job: Job) -> str:
    """The preparation array job: one task per data source, one node, no GPUs."""
    from moetrain.data.sources import data_sources

    sources = data_sources(job.cfg.data)
    slurm = job.cfg.launch.slurm
    opts = [
        f"--job-name={slurm.job_name or job.name}-prepare",
        f"--array=0-{len(sources) - 1}",
        "--nodes=1",
        "--ntasks=1",
    ]
    for key in ("cpus_per_task", "mem", "partition", "account", "qos", "time"):
        value = getattr(slurm, key)
        if value is not None:
            opts.append(f"--{key.replace('_', '-')}={value}")
    opts += [f"--chdir={job.workdir}", f"--output={job.run_dir}/prepare-%A_%a.out"]
    names = ", ".join(f"{i}: {src.name}" for i, src in enumerate(sources))
    values = {
        "name": job.name,
        "sources": names,
        "job_yaml": str(job_config_path(job)),
        "script": str(prepare_script_path(job)),
        "sbatch_options": "\n".join(f"#SBATCH {opt}" for opt in opts),
        "environment": _environment(job),
        "prepare": f"{shlex.quote(job.python)} -u -m {shlex.join(prepare_args(str(job_config_path(job))))} "
        '"$SLURM_ARRAY_TASK_ID"',
    }
    return render_template("prepare.sh", values)


def render_sbatch(job: Job) -> str:
    launch = job.cfg.launch
    values = {
        "name": job.name,
        "summary": _summary(job),
        "job_yaml": str(job_config_path(job)),
        "script": str(script_path(job)),
        "sbatch_options": "\n".join(f"#SBATCH {opt}" for opt in sbatch_options(job)),
        "environment": _environment(job),
        "master_port": str(launch.master_port) if launch.master_port else DERIVED_PORT,
        "launch": _launch_block(job),
    }
    return render_template("sbatch.sh", values)


def render_template(name: str, values: dict[str, str]) -> str:
    """Fill ``{{slot}}``s; a line holding only an empty slot disappears."""
    text = resources.files("moetrain.launch").joinpath("templates", name).read_text(encoding="utf-8")
    unknown = set(_SLOT.findall(text)) - set(values)
    if unknown:
        raise KeyError(f"template {name} has slots without values: {sorted(unknown)}")
    lines = []
    for line in text.splitlines(keepends=True):
        if line.strip().startswith("{{") and line.strip().endswith("}}") and not values[line.strip()[2:-2]]:
            continue
        lines.append(_SLOT.sub(lambda m: values[m.group(1)], line))
    return "".join(lines)


def _summary(job: Job) -> str:
    launch = job.cfg.launch
    nodes, procs = launch.nodes or 1, launch.procs
    unit = "GPUs" if launch.gpus_per_node else "processes"
    layout = "srun torchrun, one task per node" if launch.slurm.mode == "torchrun" else "one task per process"
    return f"{nodes} node(s) x {procs} {unit} = world size {nodes * procs}; {layout}"


def sbatch_options(job: Job) -> list[str]:
    launch, slurm = job.cfg.launch, job.cfg.launch.slurm
    tasks = 1 if slurm.mode == "torchrun" else launch.procs
    opts = [
        f"--job-name={slurm.job_name or job.name}",
        f"--nodes={launch.nodes or 1}",
        f"--ntasks-per-node={tasks}",
    ]
    if launch.gpus_per_node:
        opts.append(f"--gpus-per-node={launch.gpus_per_node}")
    for key in ("cpus_per_task", "mem", "partition", "account", "qos", "time"):
        value = getattr(slurm, key)
        if value is not None:
            opts.append(f"--{key.replace('_', '-')}={value}")
    opts += [f"--chdir={job.workdir}", f"--output={job.run_dir}/slurm-%j.out"]
    if slurm.requeue:
        opts += ["--requeue", f"--signal=B:USR1@{slurm.signal_seconds}", "--open-mode=append"]
    return opts + slurm.extra_sbatch


def _environment(job: Job) -> str:
    launch = job.cfg.launch
    lines = [f"export {k}={shlex.quote(v)}" for k, v in launch.env.items()] + launch.slurm.setup
    if not lines:
        return ""
    return "# Environment (launch.env) and setup (launch.slurm.setup).\n" + "\n".join(lines) + "\n"


def _srun_lines(job: Job) -> list[str]:
    """The srun command as lines of shell words ($-references left for the shell to expand)."""
    launch, slurm = job.cfg.launch, job.cfg.launch.slurm
    srun = [
        "srun",
        *(["--ntasks-per-node=1"] if slurm.mode == "torchrun" else []),
        "--kill-on-bad-exit=1",
        *map(shlex.quote, slurm.srun_args),
    ]
    worker = "-m " + shlex.join(train_args(str(job_config_path(job)), []))
    if slurm.mode == "tasks":
        return [" ".join(srun), f"{shlex.quote(job.python)} -u {worker}"]
    endpoint = shlex.quote(launch.rendezvous.endpoint) if launch.rendezvous.endpoint else '"$MASTER_ADDR:$MASTER_PORT"'
    rdzv_id = shlex.quote(launch.rendezvous.id) if launch.rendezvous.id else '"$SLURM_JOB_ID"'
    options = [
        '--nnodes "$SLURM_JOB_NUM_NODES"',
        f"--nproc-per-node {launch.procs}",
        "--rdzv-backend c10d",
        f"--rdzv-endpoint {endpoint}",
        f"--rdzv-id {rdzv_id}",
        f"--max-restarts {launch.max_restarts}",
        worker,
    ]
    return [" ".join(srun), shlex.join(tool(job.python, "torchrun")), *("    " + o for o in options)]


def _launch_block(job: Job) -> str:
    line = " \\\n    ".join(_srun_lines(job))
    if not job.cfg.launch.slurm.requeue:
        return line
    seconds = job.cfg.launch.slurm.signal_seconds
    return (
        f"# Requeue: SLURM sends USR1 to this script {seconds} s before the time limit (--signal);\n"
        "# the trap puts the job back in the queue. On preemption SLURM requeues it (--requeue).\n"
        "# Each run resumes from the latest checkpoint in the run directory (checkpoint.resume: auto).\n"
        'trap \'echo "moetrain: time limit near, requeueing job $SLURM_JOB_ID"; '
        'scontrol requeue "$SLURM_JOB_ID"\' USR1\n'
        f"{line} &\n"
        "srun_pid=$!\n"
        "# `wait` returns early when the trap runs; keep waiting until srun itself ends.\n"
        'wait "$srun_pid" && status=0 || status=$?\n'
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" && status=0 || status=$?; done\n'
        'exit "$status"'
    )


# --- the cluster ------------------------------------------------------------------------------------


def cluster_partitions() -> tuple[list[str], str | None] | None:
    """(partitions, default partition) from ``sinfo``, or None where sinfo is absent or fails."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    names = [p.strip() for p in out.stdout.split() if p.strip()]
    default = next((p.rstrip("*") for p in names if p.endswith("*")), None)
    return sorted({p.rstrip("*") for p in names}), default


def submit(plan: LaunchPlan) -> tuple[str | None, str]:
    """Submit the preparation job (if any), then the training job after it; return both job ids."""
    if plan.first is None:
        return None, _sbatch(plan.command)
    first = _sbatch(plan.first)
    return first, _sbatch([*plan.command[:-1], f"--dependency=afterok:{first}", plan.command[-1]])


def _sbatch(command: list[str]) -> str:
    """Run ``sbatch --parsable ...``; return the job id."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise UserError(f"cannot run sbatch: {exc}") from None
    if out.returncode != 0:
        raise UserError(f"sbatch rejected the job: {(out.stderr or out.stdout).strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch printed no job id (output: {out.stdout.strip()!r})")
    return job_id
