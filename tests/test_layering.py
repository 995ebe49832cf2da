"""Imports point one way: config <- model side <- parallel <- training <- cli / launch, with no cycles.

The import graph is built from the source (the AST), function-level imports included, so an import
hidden inside a function cannot close a cycle unnoticed. Imports under ``if TYPE_CHECKING:`` never
run, so they do not count for cycles; they do count for the layer rules (a type from a higher layer
is still a dependency on it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Installed module prefix -> source folder (setup.py maps kernels/ and launch/ into the package).
ROOTS = {"moetrain": REPO / "moetrain", "moetrain.kernels": REPO / "kernels", "moetrain.launch": REPO / "launch"}


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module under ``roots``: dotted name -> file (a package is its ``__init__.py``)."""
    out = {}
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str], type_checking: bool) -> set[str]:
    """The known modules that ``name`` imports (resolving ``from pkg import module`` to the module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    # `import a.b.c` names the deepest known module it reaches
    out = set()
    for mod in found:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.add(mod)
    return out


def import_graph(roots: dict[str, Path], type_checking: bool = False) -> dict[str, set[str]]:
    files = module_files(roots)
    known = set(files)
    return {name: imports_of(name, path, known, type_checking) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_moetrain_has_no_import_cycle():
    graph = import_graph(ROOTS)
    assert len(graph) > 40 and "moetrain.training.trainer" in graph["moetrain.cli"] | {
        m for deps in graph.values() for m in deps
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("inside_function", [False, True])
def test_a_planted_cycle_is_found(tmp_path, inside_function):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    b_imports_a = "def f():\n    from .. import a\n" if inside_function else "from pkg import a\n"
    (pkg / "sub" / "b.py").write_text("from . import c\n" + b_imports_a)
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.sub.c"] == set()  # TYPE_CHECKING imports never run
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    assert find_cycle(import_graph({"pkg": pkg})) is None


# Layers, bottom to top: a module may import its own layer and the ones below, never one above.
LAYERS = [
    ["moetrain.errors", "moetrain.config"],  # config: pure models, imports nothing that runs
    ["moetrain.kernels"],
    ["moetrain.moe", "moetrain.backbone", "moetrain.model", "moetrain.planning"],  # the model side (+ its memory)
    ["moetrain.data", "moetrain.checkpoint", "moetrain.run_logging", "moetrain.report"],  # data, the checkpoint format
    ["moetrain.parallel"],  # applied to a built model
    ["moetrain.training"],
    ["moetrain.inference", "moetrain.export", "moetrain.hf"],  # use what training saved; Hugging Face in and out
    ["moetrain.launch", "moetrain.commands", "moetrain.cli"],  # entry points
]
# parallelism takes plain values (a layout, groups), never the job config
EXTRA = {"moetrain.parallel": ["moetrain.config.job", "moetrain.config.loading"]}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    if module == "moetrain":
        return 0
    return next((i for i, layer in enumerate(LAYERS) if any(_under(module, p) for p in layer)), None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = [
        f"{m} is in no layer: add it to LAYERS in tests/test_layering.py" for m in sorted(graph) if _layer(m) is None
    ]
    for module, deps in sorted(graph.items()):
        if _layer(module) is None or any(_layer(dep) is None for dep in deps):
            continue
        extra = [f for prefix, forbidden in EXTRA.items() if _under(module, prefix) for f in forbidden]
        for dep in sorted(deps):
            if _layer(dep) > _layer(module) or any(_under(dep, f) for f in extra):
                bad.append(f"{module} imports {dep}")
    return bad


def test_imports_point_one_way():
    assert layer_violations(import_graph(ROOTS, type_checking=True)) == []


def test_a_planted_layer_violation_is_found():
    graph = import_graph(ROOTS, type_checking=True)
    graph["moetrain.moe.layer"] = graph["moetrain.moe.layer"] | {"moetrain.training.trainer"}
    assert layer_violations(graph) == ["moetrain.moe.layer imports moetrain.training.trainer"]


def test_the_hf_families_import_no_deepspeed():
    code = (
        "import sys, moetrain.hf.families.deepseek_v3, moetrain.hf.families.rope; "
        "bad = [m for m in sys.modules if m == 'deepspeed' or m.startswith('moetrain.training')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_config_tree_imports_no_torch():
    code = "import sys, moetrain.config; bad = [m for m in ('torch', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_module_imports_tests_or_bench_or_shadows_the_standard_library():
    """Test utilities and benchmarks never ship in the runtime package, and a module named like a
    standard-library one (``moetrain/logging.py`` once) cannot be confused with it."""
    files = module_files(ROOTS)
    bad = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            bad += [f"{name} imports {m}" for m in mods if m.split(".")[0] in ("tests", "bench", "conftest")]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in sys.stdlib_module_names and name not in ROOTS:
            bad.append(f"{name} shadows the standard library's {leaf}")
    assert bad == []


def test_checkpoint_format_inference_and_export_import_no_deepspeed():
    """eval, generate, export and import read checkpoints without DeepSpeed (it starts an accelerator
    probe and pulls in its whole runtime): the checkpoint format lives below training."""
    code = (
        "import sys, moetrain.checkpoint, moetrain.inference, moetrain.inference.loading, moetrain.export, "
        "moetrain.hf; bad = [m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')]; "
        "assert not bad, bad[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_every_module_imports_first_in_a_fresh_process():
    """Each module imported before any other moetrain module: an import cycle through a package's
    ``__init__`` (which the AST graph above does not model) fails here."""
    names = sorted(n for n in module_files(ROOTS) if not n.endswith("modeling_moetrain"))
    code = (
        "import importlib, sys, torch\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m == 'moetrain' or m.startswith('moetrain.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{n}: {exc!r}')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})
