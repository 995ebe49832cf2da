"""Docs that must move with the code."""

import re

from conftest import REPO

from moetrain.config.reference import render_reference


def test_config_reference_is_in_sync():
    expected = render_reference()
    actual = (REPO / "docs" / "config.md").read_text()
    assert actual == expected, "docs/config.md is stale: run `python -m moetrain.config.reference > docs/config.md`"


def test_readme_quickstart_has_exactly_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1].strip() for b in section.split("```bash")[1:]]
    commands = [b.split("```")[0].strip() for b in blocks]
    assert len(commands) == 2
    train, test = commands
    assert "moetrain train configs/tiny.yaml" in train and "pip install torch==2.13.0" in train
    ci = (REPO / ".ci" / "run").read_text()
    assert test in ci  # CI runs the README's test command verbatim


SOURCES = ["README.md", "docs/*.md", "moetrain/**/*.py", "kernels/*.py", "launch/*.py", "bench/*.py", "scripts/*"]
TOP = r"(?:moetrain|kernels|launch|docs|configs|bench|scripts|tests|\.ci)"
FULL_PATH = re.compile(rf"(?<![\w./-])({TOP}/[\w./-]*\w\.(?:py|md|yaml|sh|txt))")
SHORT_PATH = re.compile(r"(?<![\w./-])((?:moe|parallel|training|config|routers)/\w+\.py)")
OUTPUTS = ("bench/results/", "moetrain/runs/")  # written by runs, not part of the repository


def _files():
    for pattern in SOURCES:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and path.name != "config.md":
                yield path, path.read_text(encoding="utf-8")


def test_no_reference_points_at_a_file_that_does_not_exist():
    missing = []
    for path, text in _files():
        rel = path.relative_to(REPO)
        if "../shared" in text:
            missing.append(f"{rel}: points outside the repository (../shared)")
        for ref in FULL_PATH.findall(text):
            if not ref.startswith(OUTPUTS) and not (REPO / ref).exists():
                missing.append(f"{rel}: {ref}")
        for ref in SHORT_PATH.findall(text):
            if not any((REPO / base / ref).exists() for base in ("moetrain", "moetrain/moe")):
                missing.append(f"{rel}: {ref}")
    assert not missing, "dangling references:\n" + "\n".join(missing)


def _readme_gpu_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a GPU node", 1)[1].split("\n## ", 1)[0]
    return [b.split("```")[0].strip() for b in section.split("```bash")[1:]]


def test_the_gpu_node_commands_validate_on_an_install_without_extras(tmp_path):
    """The README's GPU commands: the torchrun one validates for 8 processes, the SLURM one for 4 x 8, in a
    process where transformers and wandb cannot be imported (an install without extras), and the config
    needs no network (no hub tokenizer or dataset)."""
    import shlex
    import subprocess
    import sys

    torchrun, slurm = _readme_gpu_commands()
    args = shlex.split(torchrun)
    assert args[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"] and args[6] == "train"
    config, overrides = args[7], [a for a in args[8:] if not a.startswith("run_dir=")]
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['wandb'] = None\n"
        "from moetrain.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for world, extra in ((8, []), (32, ["launch.nodes=4", "launch.gpus_per_node=8"])):
        cmd = [sys.executable, "-c", code, "validate", config, *overrides, *extra, "--world-size", str(world)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert f"config ok for world size {world}" in proc.stdout
    from moetrain.config import load_config

    cfg = load_config(REPO / config, overrides)
    assert not isinstance(cfg.data.tokenizer, str) or cfg.data.tokenizer in ("byte",)
    assert cfg.data.sources is None and not cfg.logging.wandb.enabled
    assert "--nodes 4 --gpus-per-node 8" in slurm and "moetrain launch " + config in slurm
