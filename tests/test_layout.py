"""The package's shape: every module imports on its own, the import graph has no cycle, and the
general library imports nothing of the built-in tasks (jaxpref/tasks/ imports the library, never the
reverse; jaxpref/cli.py, the command, is the one module that mounts the tasks' commands)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import jaxpref

ROOT = pathlib.Path(jaxpref.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in ROOT.rglob("*.py"))


def _imports(module: str) -> set[str]:
    """The jaxpref modules `module` imports anywhere in its file (top level or inside functions)."""
    path = ROOT.parent / (module.replace(".", "/") + ".py")
    is_package = not path.exists()
    if is_package:
        path = ROOT.parent / module.replace(".", "/") / "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("jaxpref") and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _with_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too (but for the
    packages `m` itself lives in, which are being imported already when `m` runs)."""
    out = {m: set(deps) for m, deps in graph.items()}
    for m, deps in graph.items():
        for d in deps:
            parts = d.split(".")
            out[m].update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                          if p in graph and not m.startswith(p + "."))
    for m in out:
        out[m].discard(m)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    assert len(MODULES) > 40
    assert find_cycle(_with_parents(GRAPH)) is None


def test_the_library_imports_no_task():
    offenders = {m: sorted(d for d in deps if d.startswith("jaxpref.tasks"))
                 for m, deps in GRAPH.items() if not m.startswith("jaxpref.tasks") and m != "jaxpref.cli"}
    assert {m: d for m, d in offenders.items() if d} == {}
    # and the task does import the library: the check above would pass on an empty graph
    assert any(d.startswith("jaxpref.train") for d in GRAPH["jaxpref.tasks.shapes.demo"])


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module):
    """A fresh interpreter per module, so an import that only works after another module ran fails."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
