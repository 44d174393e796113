"""aad's import graph: cycles, upward imports between rooms, and plugin-boundary violations.

Usage: ``python scripts/import_graph.py [--verbose]`` from the repository root. It reads the source
(it imports nothing) and counts every ``import`` that runs, at module level or inside a function;
imports under ``if TYPE_CHECKING:`` are left out, as they never run. tests/test_architecture.py
asserts the counts are zero.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "aad_core": ROOT / "aad_core",
    "aad_plugins": ROOT / "plugins" / "aad_plugins",
    "aad_langchain": ROOT / "integrations" / "langchain" / "aad_langchain",
    "aad_llamaindex": ROOT / "integrations" / "llamaindex" / "aad_llamaindex",
}

#: Each room of aad_core and its layer: a module may import its own room and lower layers only.
LAYERS: dict[str, int] = {
    "aad_core.__about__": 0, "aad_core.errors": 0, "aad_core.schema": 0, "aad_core.keyfile": 0,
    "aad_core.config": 1, "aad_core.workspace": 1, "aad_core.formats": 1, "aad_core.store": 1,
    "aad_core.plugins": 1,
    "aad_core.artifacts": 2, "aad_core.specialists": 2, "aad_core.models": 2, "aad_core.capture": 2,
    "aad_plugins": 2.5,
    "aad_core.pipeline": 3, "aad_core.serving": 3, "aad_core.report": 3, "aad_core.traces": 3,
    "aad_core.demo": 4, "aad_core.cli": 4, "aad_core.__main__": 4,
    "aad_langchain": 5, "aad_llamaindex": 5,
}

#: The aad_core modules a plugin may import: the public plugin API a third party has.
PLUGIN_API = ("aad_core", "aad_core.plugins", "aad_core.plugins.hookspecs", "aad_core.plugins.components",
              "aad_core.errors", "aad_core.schema", "aad_core.formats", "aad_core.models", "aad_core.artifacts",
              "aad_core.workspace", "aad_core.specialists")
_PLUGIN_API_PACKAGES = ("aad_core.formats", "aad_core.models")


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (resolved to the longest known module name)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg itself.
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def room(mod: str) -> str | None:
    best = None
    for r in LAYERS:
        if (mod == r or mod.startswith(r + ".")) and (best is None or len(r) > len(best)):
            best = r
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a room imports a room of a higher layer. The ``aad_core``
    package facade (lazy names for users) is exempt."""
    out = []
    for mod, targets in graph.items():
        src = room(mod)
        if src is None:
            continue
        for t in sorted(targets):
            dst = room(t)
            if dst is not None and dst != src and LAYERS[dst] > LAYERS[src]:
                out.append((mod, t))
    return out


def boundary_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(plugin module, aad_core module) pairs where a default plugin imports a non-public module."""
    out = []
    for mod, targets in graph.items():
        if not mod.startswith("aad_plugins"):
            continue
        for t in sorted(targets):
            if t.startswith("aad_core") and t not in PLUGIN_API and not t.startswith(_PLUGIN_API_PACKAGES):
                out.append((mod, t))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="list every offending import")
    args = parser.parse_args(argv)
    mods = modules()
    graph = imports(mods)
    cyc, up, leaks = cycles(graph), upward_imports(graph), boundary_violations(graph)
    print(f"modules {len(mods)}, imports {sum(map(len, graph.values()))}, cycles {len(cyc)}, "
          f"upward imports {len(up)}, plugin-boundary violations {len(leaks)}")
    if args.verbose:
        for c in cyc:
            print("  cycle:", " -> ".join(c))
        for a, b in up:
            print(f"  upward: {a} -> {b}")
        for a, b in leaks:
            print(f"  plugin imports non-public: {a} -> {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
