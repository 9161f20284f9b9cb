"""Imports flow one way: a lower layer never imports a higher one, and no modules import each other in a cycle.

An ast walk over graphopt/**/*.py collects every import of a graphopt module: at module level, inside
functions and under `if TYPE_CHECKING:` alike (a cycle hidden from the interpreter is still a cycle for
the reader). `from graphopt.x import y` is an import of module graphopt.x.y when y is a submodule, else of
graphopt.x. Importing a package's submodule is not counted as importing the package's __init__.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "graphopt"

# module (or package prefix) -> layer; a module takes the layer of its longest listed prefix
LAYERS: dict[str, int] = {
    "graphopt._version": 0,
    "graphopt.errors": 0,
    "graphopt.ir": 1,
    "graphopt.ops": 2,
    "graphopt.analysis": 3,
    "graphopt.calibration": 4,
    "graphopt.passes": 5,
    "graphopt.evaluate": 6,
    "graphopt.inspect": 6,
    "graphopt.api": 6,
    "graphopt.sweep": 6,
    "graphopt.latency_target": 6,
    "graphopt.batching": 6,
    "graphopt.cli": 7,
    "graphopt.torch": 7,
    # torch code the API reaches lazily, only when asked for (--repair): it reads ir and calibration alone
    "graphopt.torch.interpreter": 5,
    "graphopt.torch.repair": 5,
    # the front door imports the library; nothing inside the library imports it back
    "graphopt": 8,
}
LAYER_NAMES = {0: "version/errors", 1: "ir", 2: "ops", 3: "analysis", 4: "calibration", 5: "passes",
               6: "evaluate/inspect/api", 7: "cli/torch", 8: "the graphopt front door"}

# the native kernel library is registered only where onnxruntime sessions are built
NATIVE = "graphopt.ops.native"
NATIVE_IMPORTERS = {"graphopt.calibration.session"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported graphopt module, line) for every import statement in the file, wherever it sits."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in known else source, node.lineno))
    return [(name, line) for name, line in found if name == "graphopt" or name.startswith("graphopt.")]


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported module -> 'file:line' of its first import}."""
    modules = all_modules()
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for module, path in modules.items():
        graph[module]  # every module is a node, importing or not
        for target, line in imports_of(module, path, set(modules)):
            if target != module:
                graph[module].setdefault(target, f"{path.relative_to(ROOT.parent)}:{line}")
    return graph


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan, iterative: a stack of (module, its remaining successors)
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            step = next(successors, None)
            if step is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
            elif step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                on_stack.add(step)
                work.append((step, iter(sorted(graph.get(step, {})))))
            elif step in on_stack:
                low[node] = min(low[node], index[step])

    for module in sorted(graph):
        if module not in index:
            visit(module)
    found = []
    for component in sorted(components, key=min):
        uncovered = set(component) if len(component) > 1 else set()
        while uncovered:  # shortest cycles until every module of the component is on one
            cycle = _shortest_cycle(graph, component, min(uncovered))
            found.append(cycle)
            uncovered -= set(cycle)
    return found


def _shortest_cycle(graph: dict[str, dict[str, str]], component: set[str], start: str) -> list[str]:
    """A shortest closed path from `start` back to itself within the component (breadth-first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, {})):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target in component and target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(module for module in all_modules() if layer_of(module) is None)
    assert not unplaced, f"modules outside the layer table in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    broken = []
    for module, targets in sorted(import_graph().items()):
        for target, where in sorted(targets.items()):
            low, high = layer_of(module), layer_of(target)
            if low is not None and high is not None and high > low:
                broken.append(f"{where}: {module} ({LAYER_NAMES[low]}, layer {low}) imports {target} "
                              f"({LAYER_NAMES[high]}, layer {high})")
    assert not broken, "upward imports (a lower layer never imports a higher one):\n  " + "\n  ".join(broken)


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    lines = [" -> ".join(cycle) + "\n      " + ", ".join(graph[a][b] for a, b in zip(cycle, cycle[1:]))
             for cycle in found]
    assert not found, "import cycles (each with the import lines that close it):\n  " + "\n  ".join(lines)


def test_native_kernels_are_registered_only_where_sessions_are_built() -> None:
    importers = sorted(f"{where}: {module}" for module, targets in import_graph().items()
                       for target, where in targets.items() if target == NATIVE and module not in NATIVE_IMPORTERS)
    assert not importers, (f"{NATIVE} may be imported only by {sorted(NATIVE_IMPORTERS)}, "
                           "but is imported by:\n  " + "\n  ".join(importers))


def test_the_walk_sees_imports_in_functions_and_under_type_checking(tmp_path: Path) -> None:
    """The checker itself: a function-level import, a TYPE_CHECKING import and a relative import all count."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from graphopt.passes.base import PassContext\n"
                      "def f():\n    from graphopt.ir import graph as ir\n"
                      "from . import stats\n")
    known = {"graphopt.passes.base", "graphopt.ir.graph", "graphopt.calibration.stats"}
    found = {name for name, _ in imports_of("graphopt.calibration.probe", source, known)}
    assert found == known
    loop = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}, "d": {"a": "d.py:1"}}
    assert cycles(loop) == [["a", "b", "c", "a"]]
