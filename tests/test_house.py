"""The house has no circles: no two packages of exoalign import each other, directly or through others.

The imports are read from the source (``ast``), function-level imports included, so a cycle hidden inside a
function body counts too. A "package" is a subpackage (``exoalign.train``) or a top-level module
(``exoalign.sampling``); the root ``exoalign/__init__.py`` is the public facade and may re-export anything, so
imports *of* the root (``from exoalign import __version__``) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "exoalign"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every exoalign module that ``name`` imports (relative imports resolved; ``from x import y`` → x and x.y)."""
    found: set[str] = set()
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != "exoalign"}
    return found


def _unit(module: str, level: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if level == "package" else module


def _cycles(level: str) -> list[list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        a = _unit(name, level)
        for t in _imports(name, path, modules):
            b = _unit(t, level)
            if a != b:
                graph.setdefault(a, set()).add(b)
    # Tarjan's strongly connected components: every component of more than one node is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_package_level_import_cycle() -> None:
    assert _cycles("package") == []


def test_no_module_level_import_cycle() -> None:
    assert _cycles("module") == []


def test_the_checker_sees_a_cycle(tmp_path: Path, monkeypatch) -> None:
    """The checker itself: two packages that import each other (one inside a function) are reported."""
    pkg = tmp_path / "exoalign"
    for sub, text in (("a", "from ..b import x\n"), ("b", "def f():\n    from ..a import y\n")):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text(text)
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    assert _cycles("package") == [["exoalign.a", "exoalign.b"]]


def test_nothing_below_the_commands_imports_them() -> None:
    """CLI entry points sit on top: no module imports ``exoalign.cli`` or a ``*.cli`` module but __main__."""
    modules = _modules()
    for name, path in modules.items():
        if name in ("exoalign.__main__",) or name.endswith(".cli"):
            continue
        bad = {t for t in _imports(name, path, modules) if t == "exoalign.cli"}
        assert not bad, f"{name} imports {bad}"
