"""The package's imports follow the layer order of docs/design.md and form no cycle.

Every module of src/cmmas is parsed with :mod:`ast`: imports at the top level and inside
functions both count (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:``
do not. ``from cmmas.x import y`` is an import of the module ``cmmas.x.y`` when that module
exists, else of ``cmmas.x``; ``import cmmas.x.y`` is an import of ``cmmas.x.y``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cmmas"

#: Module (or package prefix) -> layer rank (docs/design.md, "Rules"). A module may import from its
#: own rank and the ranks below it, never from a higher one.
LAYERS: dict[str, int] = {
    # shared ground, used by every stage
    "cmmas": 0,
    "cmmas.errors": 0,
    "cmmas.io": 0,
    "cmmas.headers": 0,
    "cmmas.preprocess": 0,
    "cmmas.metrics": 0,
    "cmmas.drawing": 0,
    "cmmas.provenance": 0,
    # the networks (TensorFlow / Keras) and their cards
    "cmmas.nn": 1,
    # the stages, in the order data flows
    "cmmas.datasets": 2,
    "cmmas.align": 3,
    "cmmas.register": 4,
    "cmmas.fuse": 5,
    "cmmas.models": 6,  # the networks a segmentation runs
    "cmmas.segment": 6,  # the engine
    # what is built on the engine: its files, bundles, the checks of a user's request
    "cmmas.outputs": 7,
    "cmmas.bundle": 7,
    "cmmas.request": 7,
    "cmmas.evaluate": 8,
    "cmmas.cohort": 8,
    # the front doors
    "cmmas.cli": 9,
    "cmmas.scripts": 9,
}

def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported cmmas module, line)`` for every import in ``module``'s source."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in known else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported cmmas module: first line importing it}, self-imports left out."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for name, line in _imported(module, path, set(modules)):
            if name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def _layer(module: str) -> int | None:
    """The rank of the longest key of :data:`LAYERS` that is ``module`` or a package above it (the
    root ``cmmas`` key covers the package's ``__init__`` only)."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        rank = LAYERS.get(".".join(parts[:end]))
        if rank is not None:
            return rank
    return LAYERS.get(module)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in graph:
                continue
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        path, seen = [start], {start}
        while True:  # walk inside the component until the start or a repeat closes a cycle
            nxt = next((n for n in sorted(graph[path[-1]]) if n == start and len(path) > 1), None)
            if nxt is None:
                nxt = next(n for n in sorted(graph[path[-1]]) if n in members and (n not in seen or n == start))
            if nxt == start or nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _edge(graph: dict[str, dict[str, int]], a: str, b: str) -> str:
    return f"{a} -> {b} (line {graph[a][b]})"


def test_every_module_is_in_the_layer_map():
    missing = [module for module in _modules() if _layer(module) is None]
    assert not missing, "; ".join(f"add {module} to the layer map (tests/test_layering.py LAYERS)"
                                  for module in missing)


def test_imports_form_no_cycle():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        "  " + ", ".join(_edge(graph, a, b) for a, b in zip(cycle, cycle[1:])) for cycle in cycles)


def test_no_import_runs_against_the_layer_order():
    graph = _graph()
    upward = [
        f"  {_edge(graph, module, name)}: layer {_layer(module)} imports layer {_layer(name)}"
        for module, edges in sorted(graph.items())
        for name in sorted(edges)
        if None not in (_layer(module), _layer(name)) and _layer(name) > _layer(module)
    ]
    assert not upward, "imports against the layer order of docs/design.md:\n" + "\n".join(upward)


def test_the_parser_sees_lazy_imports_and_skips_type_checking(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from typing import TYPE_CHECKING\n"
                    "from cmmas import io\n"
                    "import cmmas.align.ants\n"
                    "if TYPE_CHECKING:\n"
                    "    from cmmas.segment import Segmenter\n"
                    "def f():\n"
                    "    from cmmas.fuse.vote import decide\n"
                    "    from . import scripts\n", encoding="utf-8")
    known = {"cmmas.io", "cmmas.align.ants", "cmmas.fuse.vote", "cmmas.scripts", "cmmas.segment"}
    assert _imported("cmmas.probe", path, known) == [
        ("cmmas.io", 2), ("cmmas.align.ants", 3), ("cmmas.fuse.vote", 7), ("cmmas.scripts", 8)]


def test_a_cycle_is_reported_closed():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
