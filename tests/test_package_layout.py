"""One way through the code: the import graph between packages has no cycle.

A node is a subpackage of dspark_trt (`dspark_trt.spec`, ...), one of its top-level modules
(`dspark_trt.cli`, `dspark_trt.errors`, the package itself for `from dspark_trt import __version__`), or
`plugins/` (installed as dspark_trt_plugins). Every import counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dspark_trt": ROOT / "dspark_trt", "dspark_trt_plugins": ROOT / "plugins"}


def node_of(module: str) -> str | None:
    """The graph node a module belongs to (None outside the project)."""
    parts = module.split(".")
    if parts[0] == "dspark_trt_plugins":
        return "plugins"
    if parts[0] != "dspark_trt":
        return None
    if len(parts) == 1:
        return "dspark_trt"
    return "dspark_trt." + parts[1] if parts[1] != "__version__" else "dspark_trt"


def imported_modules(path: Path, module: str) -> list[tuple[str, int]]:
    """(module, line) of every import in a file, relative ones resolved, `from p import name` as p.name too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """edges[a][b]: where node a imports node b ("path:line")."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            module = ".".join((name, *parts[:-1]) if parts[-1] == "__init__" else (name, *parts))
            source = node_of(module)
            for target, line in imported_modules(path, module):
                dest = node_of(target)
                if dest is not None and dest != source:
                    edges[source][dest].append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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

    for v in sorted(set(edges) | {w for targets in edges.values() for w in targets}):
        if v not in index:
            visit(v)
    return found


def test_packages_import_each_other_in_one_direction_only():
    edges = import_graph()
    report = []
    for component in cycles(edges):
        inside = [f"  {a} -> {b}: {', '.join(edges[a][b][:3])}" for a in component for b in component
                  if b in edges.get(a, {})]
        report.append(f"cycle {' <-> '.join(component)}:\n" + "\n".join(inside))
    assert not report, "\n".join(report)


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    """A cycle closed by an import inside a function, or by a relative import, is still a cycle."""
    edges = {"dspark_trt.export": {"dspark_trt.runtimes": ["export/x.py:9"]},
             "dspark_trt.runtimes": {"dspark_trt.graphs": ["runtimes/y.py:3"]},
             "dspark_trt.graphs": {"dspark_trt.export": ["graphs/z.py:40"]}}
    assert cycles(edges) == [["dspark_trt.export", "dspark_trt.graphs", "dspark_trt.runtimes"]]
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..export import engines\n    import dspark_trt_plugins.ort_op\n")
    found = {m for m, _ in imported_modules(source, "dspark_trt.runtimes.mod")}
    assert {"dspark_trt.export", "dspark_trt.export.engines", "dspark_trt_plugins.ort_op"} <= found
    assert {node_of(m) for m in found} == {"dspark_trt.export", "plugins"}
