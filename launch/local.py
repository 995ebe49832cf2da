"""torchrun and deepspeed-launcher commands (run on this machine; multi-node: on every node / via pdsh)."""

from __future__ import annotations

from pathlib import Path

from moetrain.config.launch import DEFAULT_PORT, LaunchConfig
from moetrain.errors import UserError
from moetrain.launch.hostfile import render_hostfile
from moetrain.launch.plan import Job, LaunchPlan, tool, train_args


def rendezvous_endpoint(launch: LaunchConfig) -> str | None:
    """``launch.rendezvous.endpoint``, else ``master_addr:master_port``, else None."""
    if launch.rendezvous.endpoint:
        return launch.rendezvous.endpoint
    if launch.master_addr:
        return f"{launch.master_addr}:{launch.master_port or DEFAULT_PORT}"
    return None


def torchrun_plan(job: Job) -> LaunchPlan:
    """``torchrun --standalone`` on one node; a c10d rendezvous (run it on every node) for several."""
    launch = job.cfg.launch
    nodes = launch.nodes or 1
    endpoint = rendezvous_endpoint(launch)
    cmd = tool(job.python, "torchrun")
    if nodes == 1 and endpoint is None:
        cmd += ["--standalone"]
    else:
        if endpoint is None:
            raise UserError(
                f"a multi-node torchrun launch (launch.nodes={nodes}) needs a rendezvous address every node "
                "can reach: set launch.rendezvous.endpoint=HOST:PORT (or --master-addr HOST), then run the "
                "same command on every node"
            )
        cmd += [
            "--nnodes",
            str(nodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            launch.rendezvous.id or job.name,
        ]
    cmd += ["--nproc-per-node", str(launch.procs)]
    if launch.max_restarts:
        cmd += ["--max-restarts", str(launch.max_restarts)]
    cmd += ["-m", *train_args(job.config_path, job.overrides)]
    return LaunchPlan(command=cmd, env=dict(launch.env))


def deepspeed_hostfile(job: Job) -> str | None:
    """The hostfile the deepspeed launcher reads: launch.hostfile, or one generated from launch.hosts."""
    launch = job.cfg.launch
    if launch.hosts:
        return str(job.run_dir / "hostfile")
    return launch.hostfile


def deepspeed_plan(job: Job) -> LaunchPlan:
    """``deepspeed [--hostfile H] [--include/--exclude | --num_nodes N --num_gpus P] --module ...``."""
    launch = job.cfg.launch
    cmd = tool(job.python, "deepspeed")
    files: dict[Path, str] = {}
    env = dict(launch.env)
    hostfile = deepspeed_hostfile(job)
    if launch.hosts:
        files[Path(hostfile)] = render_hostfile(launch.hosts, launch.procs)
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if launch.include or launch.exclude:
        # NOTE: deepspeed refuses --num_nodes / --num_gpus next to a filter.
        cmd += ["--include", launch.include] if launch.include else ["--exclude", launch.exclude]
    else:
        if hostfile and launch.nodes is not None:
            cmd += ["--num_nodes", str(launch.nodes)]
        if not hostfile or (launch.hostfile and (launch.procs_per_node or launch.gpus_per_node)):
            cmd += ["--num_gpus", str(launch.procs)]
    if launch.master_addr:
        cmd += ["--master_addr", launch.master_addr]
    if launch.master_port:
        cmd += ["--master_port", str(launch.master_port)]
    if hostfile and launch.env:
        # Remote nodes (pdsh) do not inherit this environment; deepspeed exports what DS_ENV_FILE lists.
        env_file = job.run_dir / "deepspeed_env"
        files[env_file] = "".join(f"{k}={v}\n" for k, v in launch.env.items())
        env["DS_ENV_FILE"] = str(env_file)
    cmd += ["--module", "--no_local_rank", *train_args(job.config_path, job.overrides)]
    return LaunchPlan(command=cmd, env=env, files=files)
