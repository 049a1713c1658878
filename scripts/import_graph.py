"""Print moekit's internal import graph (module -> moekit modules it imports) and its cycles.

Reads the source with `ast` only (nothing is imported). Imports inside functions are lazy and are
listed apart (`--lazy` includes them in the cycle search). A package's own `__init__` running before
its submodules is not an edge (that is how packages work, not a cycle), nor is an import under
`if TYPE_CHECKING:`. Usage:
    python scripts/import_graph.py [--root moekit] [--lazy] [--cycles-only]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set[str]) -> set[str]:
    """The moekit modules one import statement loads (`from a import b` is a.b when that is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:
        package = here if is_package else here.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif base in known:
            out.add(base)
    return out


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(top-level imports, function-level imports): module -> moekit modules it imports."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    eager: dict[str, set[str]] = {m: set() for m in files}
    lazy: dict[str, set[str]] = {m: set() for m in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        top: set[int] = set()
        typing_only: set[int] = set()
        for stmt in tree.body:  # module-level statements run on import (try blocks included)
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
                typing_only.update(id(n) for n in ast.walk(stmt))  # for type checkers only, never run
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    break
                top.add(id(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                found = _targets(node, name, is_package, known) - {name}
                (eager if id(node) in top else lazy)[name].update(found)
    return eager, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent / "moekit")
    parser.add_argument("--lazy", action="store_true", help="count function-level imports as edges too")
    parser.add_argument("--cycles-only", action="store_true")
    args = parser.parse_args(argv)
    eager, lazy = graph(args.root)
    edges = {m: eager[m] | (lazy[m] if args.lazy else set()) for m in eager}
    if not args.cycles_only:
        for module in sorted(eager):
            line = f"{module} -> {', '.join(sorted(eager[module])) or '-'}"
            if lazy[module]:
                line += f"   [in functions: {', '.join(sorted(lazy[module]))}]"
            print(line)
        print()
    found = cycles(edges)
    kind = "top-level and function-level" if args.lazy else "top-level"
    print(f"{len(found)} import cycle(s) over {kind} imports" + (":" if found else ""))
    for component in found:
        print("  " + " <-> ".join(component))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
