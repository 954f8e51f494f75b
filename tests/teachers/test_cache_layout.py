"""The shape of the teacher-cache package: small modules, no import circle through the teachers package, and the
import paths from before the split still give the same objects."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[2] / "src"
PACKAGE = SRC / "lmdistill" / "teachers" / "cache"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_load(path: Path, modules: set[str]) -> set[str]:
    """The lmdistill modules ``path`` imports while it loads (top-level statements; imports inside functions run
    later and cannot form a circle at import time). ``from a.b import c`` counts as importing ``a.b.c`` when that is
    a module, else ``a.b``."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return {name for name in out if name in modules}


def test_every_module_of_the_cache_package_is_under_400_lines():
    lengths = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert {"reader.py", "sparse.py", "lowrank.py", "writer.py", "manifest.py", "format.py"} <= set(lengths)
    assert max(lengths.values()) < 400, lengths


def test_no_import_circle_runs_through_the_teachers_package():
    files = {_module_name(p): p for p in (SRC / "lmdistill").rglob("*.py")}
    graph = {name: _imports_at_load(path, set(files)) for name, path in files.items()}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        for nxt in graph[name]:
            if nxt in trail:
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif len(trail) < 30:
                visit(nxt, trail + [nxt])

    for start in (name for name in graph if name.startswith("lmdistill.teachers")):
        visit(start, [start])
    assert not circles, circles[:3]


def test_the_old_import_paths_give_the_same_objects():
    from lmdistill.teachers import cache, cache_run, lowrank
    from lmdistill.teachers.cache import command, projection, reader

    assert lowrank.LowRankProjection is projection.LowRankProjection and lowrank.fit_projection is projection.fit_projection
    assert cache_run.CacheTeacherConfig is command.CacheTeacherConfig
    assert cache.TeacherCache is reader.TeacherCache and cache.open_teacher_cache is reader.open_teacher_cache
