"""The shape of the source tree: no module over 600 lines, no import circle anywhere in lmdistill, no teacher
probed by hasattr and no switch over teacher-signal types outside the signal module, no TGeo line in the trainer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.teachers.test_cache_layout import _imports_at_load, _module_name

SRC = Path(__file__).parents[1] / "src"
FILES = sorted((SRC / "lmdistill").rglob("*.py"))


def test_no_module_is_longer_than_600_lines():
    long = {str(p.relative_to(SRC)): n for p in FILES if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_lmdistill():
    files = {_module_name(p): p for p in FILES}
    graph = {name: _imports_at_load(path, set(files)) for name, path in files.items()}
    # a package's __init__ importing its own submodules is how packages work, not a circle back into them
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m.startswith(name + ".") and files[name].name == "__init__.py")}
    assert _strongly_connected(graph) == []


def test_the_planted_circle_is_found():
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_teachers_are_never_probed_and_the_trainer_has_no_method_specific_lines():
    probes = [f"{p.relative_to(SRC)}:{i}" for p in FILES for i, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"hasattr\([^)]*teacher", line)]
    assert not probes
    assert not re.search("tgeo", (SRC / "lmdistill" / "train" / "trainer.py").read_text(), re.IGNORECASE)
    switches = []
    for p in FILES:
        if p.name == "signals.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                shown = ast.unparse(node.args[1])
                if re.search(r"\b(SparseTeacher|HiddenStates|LowRankCodes)\b", shown):
                    switches.append(f"{p.relative_to(SRC)}:{node.lineno}: {shown}")
    assert not switches, switches
