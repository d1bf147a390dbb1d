"""The package's shape: layers point down only, and one module touches the compiled core.

Read from the source with ``ast`` (every import, at module level or inside a function, counts),
so a cycle or a second importer of ``shmalloc._native`` fails here before anyone trips on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shmalloc"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every shmalloc module ``path`` imports: ``from X import a`` counts X.a when that is one of
    ``modules``, else X (a package's names come from its __init__)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("shmalloc"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("shmalloc"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = frozenset(files) | {"shmalloc._native", "shmalloc._fastcall"}
    return {
        name: {m for m in _imports(path, modules) if m in files and m != name}
        for name, path in files.items()
    }


@pytest.mark.parametrize("compiled", ["shmalloc._native", "shmalloc._fastcall"])
def test_only_the_binding_imports_the_compiled_modules(compiled: str) -> None:
    importers = sorted(
        _module_name(p)
        for p in PACKAGE.rglob("*.py")
        if compiled in _imports(p, frozenset({compiled}))
    )
    assert importers == ["shmalloc._binding"]


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
