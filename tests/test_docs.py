"""Docs that must move with the code."""

from conftest import REPO

from moetrain.config_docs import render_reference


def test_config_reference_is_in_sync():
    expected = render_reference()
    actual = (REPO / "docs" / "config.md").read_text()
    assert actual == expected, "docs/config.md is stale: run `python -m moetrain.config_docs > docs/config.md`"


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
