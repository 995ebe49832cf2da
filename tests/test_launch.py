"""``moetrain launch`` without starting anything: rendered commands and sbatch scripts against golden
files, the launch: config section, deepspeed hostfile resolution, and pre-flight rejections.

Golden files live in tests/golden/; regenerate them on purpose with MOETRAIN_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG

from moetrain.cli import main
from moetrain.config import load_config
from moetrain.errors import UserError
from moetrain.launch import hostfile

GOLDEN = REPO / "tests" / "golden"
PY = "launch.python=/opt/venv/bin/python"

TINY_ = str(TINY_CONFIG)
# name -> moetrain launch arguments (overrides first, then flags)
CASES = {
    "torchrun_single": [TINY_, "train.steps=20", PY, *"--procs-per-node 2".split()],
    "torchrun_multinode": [TINY_, PY, "launch.env.NCCL_DEBUG=WARN", *"--nodes 2 --gpus-per-node 8".split(),
                           *"--rdzv-endpoint node0:29400 --max-restarts 3".split()],
    "deepspeed_hosts": [TINY_, PY, "launch.hosts=[node0,node1]", "launch.env.NCCL_DEBUG=WARN",
                        *"--launcher deepspeed --gpus-per-node 4 --master-addr node0".split()],
    "deepspeed_include": [TINY_, PY, "--launcher", "deepspeed", "--hostfile", str(GOLDEN / "hostfile"),
                          "--include", "node0@node1:0,2"],
    "slurm_cluster": [str(GOLDEN / "cluster.yaml")],
    "slurm_tasks_cpu": [TINY_, PY, *"--launcher slurm --slurm-mode tasks --procs-per-node 2".split(),
                        *"--partition debug --time 30".split()],
    "slurm_prepare_mixture": [TINY_, PY, f"data.sources=[{{name: docs, paths: [{REPO}/docs], weight: 0.2}}, "
                              f"{{name: code, paths: [{REPO}/moetrain], weight: 0.8}}]",
                              *"--launcher slurm --procs-per-node 2 --partition debug --time 30 --prepare".split()],
}  # fmt: skip


@pytest.fixture
def fake_sinfo(tmp_path, monkeypatch):
    """Put an ``sinfo`` on PATH that lists the given partitions (a trailing * marks the default)."""

    def install(*partitions: str) -> None:
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "sinfo"
        script.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(partitions) + "\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    return install


@pytest.fixture
def workdir(tmp_path, monkeypatch, fake_sinfo):
    """Run in an empty folder (run dirs land in it) on a cluster with partitions debug (default) and gpu."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    fake_sinfo("'debug*'", "gpu")
    return work


def launch(*args: str) -> int:
    return main(["launch", *args])


def normalise(text: str, work: Path) -> str:
    return text.replace(str(work), "<WORK>").replace(str(REPO), "<REPO>")


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_matches_golden(name, workdir, capsys):
    assert launch(*CASES[name], "--dry-run") == 0
    out, err = capsys.readouterr()
    got = normalise(out, workdir)
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("MOETRAIN_UPDATE_GOLDEN") == "1":
        golden.write_text(got)
    assert got == golden.read_text(), f"{name}: rendered output differs from {golden}"
    assert err.startswith("dry run: nothing written or started")
    assert list(workdir.iterdir()) == []  # a dry run writes nothing


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("slurm")])
def test_rendered_sbatch_scripts_are_valid_bash(name):
    assert subprocess.run(["bash", "-n", str(GOLDEN / f"{name}.txt")]).returncode == 0


def test_slurm_plan_writes_script_and_resolved_config(workdir, capsys):
    """What a real submission writes: the script and the job's config, frozen with an absolute run_dir."""
    from moetrain.launch import slurm
    from moetrain.launch.plan import Job

    cfg = load_config(GOLDEN / "cluster.yaml")
    run_dir = workdir / "runs" / "moe-cluster"
    job = Job(cfg, str(GOLDEN / "cluster.yaml"), [], "python", run_dir, workdir)
    plan = slurm.slurm_plan(job)
    assert plan.command == ["sbatch", "--parsable", str(run_dir / "job.sbatch")]
    assert plan.files[run_dir / "job.sbatch"] == plan.script
    frozen = load_config(_write(workdir / "job.yaml", plan.files[run_dir / "job.yaml"]))
    assert frozen.run_dir == str(run_dir)
    assert frozen.model_copy(update={"run_dir": None}) == cfg


def _fake_sbatch(folder: Path, first_id: int = 101) -> Path:
    """An ``sbatch`` on PATH that records its arguments (one line each, tab-separated) and prints job
    ids from ``first_id`` on: the launcher's real submission code runs, on a machine without SLURM too."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "calls.txt"
    script = folder / "sbatch"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(wc -l < "{log}" 2>/dev/null || echo 0)\n'
        f'(IFS="$(printf "\\t")"; echo "$*") >> "{log}"\n'
        f"echo $(({first_id} + n))\n"
    )
    script.chmod(0o755)
    return log


def test_prepare_array_job_runs_before_training(workdir, monkeypatch, capsys, tmp_path):
    """--prepare: the array job is submitted first; training waits for it (afterok)."""
    log = _fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert launch(*CASES["slurm_prepare_mixture"]) == 0
    run_dir = workdir / "runs" / "tiny"
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    assert calls == [
        ["--parsable", str(run_dir / "prepare.sbatch")],
        ["--parsable", "--dependency=afterok:101", str(run_dir / "job.sbatch")],
    ]
    out = capsys.readouterr().out
    assert "submitted data preparation array job 101" in out and "submitted batch job 102 (starts after job 101" in out
    script = (run_dir / "prepare.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "(0: docs, 1: code)" in script
    assert "moetrain.cli prepare " + str(run_dir / "job.yaml") + ' --source "$SLURM_ARRAY_TASK_ID"' in script


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_override_the_yaml_launch_section(workdir, capsys):
    cfg_path = _write(workdir.parent / "job.yaml", "name: j\nlaunch:\n  gpus_per_node: 8\n  nodes: 4\n")
    assert launch(str(cfg_path), PY, "--procs-per-node", "2", "--nodes", "1", "--dry-run") == 0
    assert "--standalone --nproc-per-node 2 " in capsys.readouterr().out


def test_overrides_after_flags_reach_the_config(workdir, capsys):
    assert launch(str(TINY_CONFIG), "--procs-per-node", "2", "train.steps=7", PY, "--dry-run") == 0
    # launch.* overrides configure the launch; the workers get the rest
    assert capsys.readouterr().out.endswith(f"-m moetrain.cli train {TINY_CONFIG} train.steps=7\n")


# --- the launch: section ---------------------------------------------------------------------------


def test_launch_config_defaults_and_coercions():
    cfg = load_config(
        TINY_CONFIG,
        ["launch.env={OMP_NUM_THREADS: 4, DEBUG: true}", "launch.slurm.extra_sbatch=['#SBATCH --exclusive']"],
    )
    assert cfg.launch.launcher == "torchrun" and cfg.launch.procs == 1 and cfg.launch.nodes is None
    assert cfg.launch.env == {"OMP_NUM_THREADS": "4", "DEBUG": "true"}
    assert cfg.launch.slurm.extra_sbatch == ["--exclusive"]
    assert cfg.launch.slurm.mode == "torchrun"


def test_launch_config_imports_without_torch():
    code = "import sys, moetrain.config; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


BAD_LAUNCH = [
    (["launch.slurm.time=4h"], "launch.slurm.time: '4h' is not a SLURM time limit"),
    (["launch.slurm.mem=lots"], "launch.slurm.mem: 'lots' is not a SLURM memory size"),
    (["launch.slurm.extra_sbatch=[exclusive]"], "'exclusive' is not an sbatch option"),
    (["launch.procs_per_node=2", "launch.gpus_per_node=2"], "procs_per_node and gpus_per_node are mutually"),
    (["launch.include=a", "launch.exclude=b"], "include and exclude are mutually exclusive"),
    (["launch.env={1X: a}"], "launch.env: '1X' is not an environment variable name"),
    (["launch.nodes=0"], "launch.nodes: Input should be greater than or equal to 1 (got 0)"),
    (["launch.slurm.mode=mpi"], "launch.slurm.mode: Input should be 'torchrun' or 'tasks' (got 'mpi')"),
    (["launch.rendezvous.endpont=x"], "did you mean 'endpoint'"),
]


@pytest.mark.parametrize("overrides,message", BAD_LAUNCH, ids=[o[0] for o, _ in BAD_LAUNCH])
def test_bad_launch_section(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(TINY_CONFIG, overrides)
    assert message in str(err.value)


# --- deepspeed hosts --------------------------------------------------------------------------------


def test_deepspeed_resolution_mirrors_the_launcher():
    pool = {"a": 4, "b": 4}
    assert hostfile.resolve(pool, "a@b:0,2", None, None, None) == {"a": [0, 1, 2, 3], "b": [0, 2]}
    assert hostfile.resolve(pool, None, "b", None, None) == {"a": [0, 1, 2, 3]}
    assert hostfile.resolve(pool, None, "a:1,3", None, None) == {"a": [0, 2], "b": [0, 1, 2, 3]}
    assert hostfile.resolve(pool, None, None, 1, 2) == {"a": [0, 1]}
    with pytest.raises(UserError, match="host 'c' is not among the hosts"):
        hostfile.resolve(pool, "c", None, None, None)
    with pytest.raises(UserError, match="host 'a' has no slot 7"):
        hostfile.resolve(pool, "a:7", None, None, None)
    with pytest.raises(UserError, match=r"launch.nodes \(3\) exceeds the 2 host"):
        hostfile.resolve(pool, None, None, 3, None)


def test_hostfile_parsing_and_rendering():
    assert hostfile.parse_hostfile("# c\nn0 slots=4\n\nn1 slots=2\n", "hf") == {"n0": 4, "n1": 2}
    assert hostfile.render_hostfile(["n0", "n1"], 8) == "n0 slots=8\nn1 slots=8\n"
    with pytest.raises(UserError, match="hf, line 2: 'n1 4' is not of the form 'HOST slots=N'"):
        hostfile.parse_hostfile("n0 slots=4\nn1 4\n", "hf")
    with pytest.raises(UserError, match="host 'n0' is listed twice"):
        hostfile.parse_hostfile("n0 slots=4\nn0 slots=4\n", "hf")


def test_deepspeed_plan_generates_hostfile_and_env_file(tmp_path):
    from moetrain.launch import local
    from moetrain.launch.plan import Job

    cfg = load_config(TINY_CONFIG, ["launch.hosts=[n0,n1]", "launch.gpus_per_node=2", "launch.env.X=1"])
    plan = local.deepspeed_plan(Job(cfg, "c.yaml", [], "/v/bin/python", tmp_path, tmp_path))
    assert plan.files[tmp_path / "hostfile"] == "n0 slots=2\nn1 slots=2\n"
    assert plan.files[tmp_path / "deepspeed_env"] == "X=1\n"
    assert plan.env == {"X": "1", "DS_ENV_FILE": str(tmp_path / "deepspeed_env")}


# --- pre-flight: rejected before anything starts, one message, exit code 2 -------------------------

HOSTFILE = str(GOLDEN / "hostfile")
DEEPSPEED_6 = ["--hostfile", HOSTFILE, "--include", "node0@node1:0,2"]  # 4 + 2 slots
REJECTED = [  # (arguments after CONFIG, what the one error message says)
    ("--launcher mpi".split(),
     "launch.launcher: Input should be 'torchrun', 'deepspeed' or 'slurm' (got 'mpi')"),
    ("moe.expert_parallel_size=2 --procs-per-node 3".split(),
     "launch.nodes (1) x 3 processes per node = world size 3: world size (3) must be divisible by "
     "moe.expert_parallel_size (2)"),
    ("moe.expert_parallel_size=4 --launcher slurm --nodes 3 --gpus-per-node 2".split(),
     "world size 6: world size (6) must be divisible by moe.expert_parallel_size (4)"),
    (["moe.expert_parallel_size=4", "--launcher=deepspeed", *DEEPSPEED_6],
     "the deepspeed hosts and filters give world size 6: world size (6) must be divisible"),
    ("--nodes 2".split(), "a multi-node torchrun launch (launch.nodes=2) needs a rendezvous address"),
    ("--launcher deepspeed --nodes 2".split(),
     "a multi-node deepspeed launch (launch.nodes=2) needs the hosts"),
    ("--launcher deepspeed --hostfile nowhere/hostfile".split(),
     "launch.hostfile: 'nowhere/hostfile' does not"),
    (["--launcher", "deepspeed", "--hostfile", HOSTFILE, "--include", "node9"],
     "launch.include: host 'node9' is not among the hosts (node0, node1)"),
    ("--launcher slurm --partition bigmem".split(),
     "launch.slurm.partition 'bigmem' does not exist on this cluster; partitions: debug (default), gpu"),
    ("--launcher slurm --slurm-mode tasks --max-restarts 2".split(),
     "launch.max_restarts (2) restarts torchrun's workers, but launcher slurm with launch.slurm.mode=tasks"),
    ("checkpoint.resume=none --launcher slurm --requeue".split(),
     "launch.slurm.requeue needs checkpoint.resume: auto (got 'none')"),
    ("--launcher slurm --time 4h".split(), "launch.slurm.time: '4h' is not a SLURM time limit"),
    ("--procs-per-node 2 --gpus-per-node 2".split(), "--gpus-per-node and --procs-per-node are mutually"),
    ("data.paths=[no/such/file.txt]".split(), "data.paths[0]:"),
    ("run_dir=/etc/hostname/run".split(),
     "run_dir: '/etc/hostname/run' cannot be created, '/etc/hostname' is a file"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", REJECTED, ids=[" ".join(a)[:60] for a, _ in REJECTED])
def test_bad_launch_is_rejected_before_anything_starts(args, message, workdir, capsys):
    code = launch(str(TINY_CONFIG), *args, "--dry-run")
    out, err = capsys.readouterr()
    assert code == 2, err
    assert message in err
    assert err.startswith("error: ") and "Traceback" not in err and out == ""
    assert list(workdir.iterdir()) == []


def test_missing_partition_when_the_cluster_has_no_default(workdir, fake_sinfo, capsys):
    fake_sinfo("gpu", "cpu")
    assert launch(str(TINY_CONFIG), "--launcher", "slurm", "--dry-run") == 2
    err = capsys.readouterr().err
    assert "launch.slurm.partition is required: this cluster has no default partition" in err
    assert "one of: cpu, gpu" in err
    assert launch(str(TINY_CONFIG), "--launcher", "slurm", "--partition", "gpu", "--dry-run") == 0


def test_submission_needs_sbatch(workdir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(workdir))  # no sbatch anywhere
    assert launch(str(TINY_CONFIG), "--launcher", "slurm") == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err


@pytest.mark.parametrize("launcher,package", [("torchrun", "torch"), ("deepspeed", "deepspeed")])
def test_launch_python_must_find_the_launcher(launcher, package, workdir, tmp_path, capsys):
    """Not a dry run: launch.python missing, or unable to import the launcher's package (``-S``: no
    site-packages), is one message and exit 2 before anything starts."""
    missing = tmp_path / "nowhere" / "python"
    assert launch(str(TINY_CONFIG), "--launcher", launcher, f"launch.python={missing}") == 2
    assert f"launch.python: {missing} not found" in capsys.readouterr().err
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    assert launch(str(TINY_CONFIG), "--launcher", launcher, f"launch.python={bare}") == 2
    err = capsys.readouterr().err
    assert f"launch.python ({bare}) cannot import {package}, which runs the {launcher} launcher" in err
    assert "Traceback" not in err and list(workdir.iterdir()) == []


def test_unwritable_run_dir_is_rejected_before_launch(tmp_path):
    from moetrain.launch.preflight import check_run_dir

    check_run_dir(tmp_path / "a" / "b", create=True)
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(UserError, match="run_dir: cannot write to '/proc/moetrain-run'"):
        check_run_dir(Path("/proc/moetrain-run"), create=True)  # even root cannot create folders in /proc
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere
        with pytest.raises(UserError, match="is not writable"):
            check_run_dir(locked / "run", create=False)


def test_data_mounted_only_on_the_compute_nodes_can_skip_the_data_check(workdir, capsys):
    """launch.check_data=false: the launch does not read the data from the submitting host (the job's
    rank 0 still checks it at start); by default a path this host cannot read is refused."""
    args = [str(TINY_CONFIG), "data.paths=[/mnt/only-on-compute-nodes/corpus.txt]", "--launcher", "slurm"]
    assert launch(*args, "--partition", "debug", "--dry-run") == 2
    assert "data.paths[0]:" in capsys.readouterr().err
    assert launch(*args, "--partition", "debug", "launch.check_data=false", "--dry-run") == 0
    assert "#SBATCH" in capsys.readouterr().out
