"""The package's layers (docs/architecture.md): no import cycle between its subpackages and top-level modules, counting
imports inside functions, and the low layer ``walk/`` reaches no method, job or command line.

The graph is read from the source with ``ast`` rather than from ``sys.modules``: a function-level import runs only
when its function does, so importing the package would miss exactly the back edges this test is for.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sparsefit"

# What walk/ must not reach, directly or through another layer: methods, evaluation, export, jobs, command line.
ABOVE_WALK = {f"{PACKAGE}.{name}" for name in ("prune", "recover", "evaluate", "export", "app", "cli",
                                               "cli_progress", "__main__")}  # fmt: skip

Graph = dict[str, dict[str, list[str]]]  # layer -> imported layer -> the "module:line" sites of those imports


def package_sources(root: Path = SOURCE) -> dict[str, tuple[str, bool]]:
    """Every module of the package by dotted name: (its source, whether it is a package's ``__init__``)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path.read_text(encoding="utf-8"), is_package)
    return modules


def layer(module: str) -> str:
    """The layer a module belongs to: its subpackage or top-level module (``sparsefit.walk.shards`` ->
    ``sparsefit.walk``); the package's own ``__init__`` is ``sparsefit``."""
    return ".".join(module.split(".")[:2])


def imported_modules(name: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) of every import in a module's source, at any depth (inside functions, ``if TYPE_CHECKING``)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..walk import x` inside sparsefit.models.random is sparsefit.walk
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from sparsefit import distributed` imports the module sparsefit.distributed
                submodule = f"{module}.{alias.name}"
                found.append((submodule if submodule in known else module, node.lineno))
    return found


def import_graph(modules: dict[str, tuple[str, bool]], unit=layer) -> Graph:
    """The imports between the package's layers (within one layer left out); ``unit=str``: between its files."""
    graph: Graph = {}
    for name, (source, is_package) in modules.items():
        for target, line in imported_modules(name, source, is_package, set(modules)):
            outside = target != PACKAGE and not target.startswith(PACKAGE + ".")
            if outside or unit(target) == unit(name):
                continue
            sites = graph.setdefault(unit(name), {}).setdefault(unit(target), [])
            if f"{name}:{line}" not in sites:  # one site per line, however many names it imports
                sites.append(f"{name}:{line}")
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of layers as a path that ends where it starts, or None (a depth-first search in sorted order)."""
    on_path: list[str] = []
    finished: set[str] = set()

    def visit(unit: str) -> list[str] | None:
        on_path.append(unit)
        for target in sorted(graph.get(unit, {})):
            if target in on_path:
                return on_path[on_path.index(target) :] + [target]
            if target not in finished and (cycle := visit(target)):
                return cycle
        on_path.pop()
        finished.add(unit)
        return None

    for unit in sorted(graph):
        if unit not in finished and (cycle := visit(unit)):
            return cycle
    return None


def describe(graph: Graph, path: list[str]) -> str:
    """A path of layers, one edge a line, each with the imports that make it."""
    return "\n".join(f"  {a} -> {b}  ({', '.join(graph[a][b])})" for a, b in pairwise(path))


def reachable(graph: Graph, start: str) -> dict[str, list[str]]:
    """Every layer that ``start`` imports directly or through others, with one path to it."""
    paths = {start: [start]}
    pending = [start]
    while pending:
        unit = pending.pop()
        for target in sorted(graph.get(unit, {})):
            if target not in paths:
                paths[target] = paths[unit] + [target]
                pending.append(target)
    del paths[start]
    return paths


def test_no_import_cycle_between_layers():
    graph = import_graph(package_sources())
    assert f"{PACKAGE}.models" in graph.get(f"{PACKAGE}.walk", {}), "the graph lost walk -> models: is it read?"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between layers:\n" + describe(graph, cycle)


def test_walk_reaches_no_method_job_or_command_line():
    graph = import_graph(package_sources())
    above = {unit: path for unit, path in reachable(graph, f"{PACKAGE}.walk").items() if unit in ABOVE_WALK}
    assert not above, "walk/ imports layers above it:\n" + "\n".join(describe(graph, p) for p in above.values())


def test_the_check_sees_a_back_edge_inside_a_function():
    """The cycle this test was written for: the random-model writer in models/ imported walk's shard writer inside
    its function, while walk/ imports models/ at the top. Any import, at any depth, relative or not, closes it."""
    walk = {"sparsefit.walk.shards": ("from sparsefit.models.loading import read_safetensors_header\n", False)}
    for back_edge in ("from sparsefit.walk.shards import write_shard", "from ..walk.shards import write_shard",
                      "from sparsefit import walk", "import sparsefit.walk.shards"):  # fmt: skip
        models = {"sparsefit.models": ("", True), "sparsefit.models.loading": ("", False),
                  "sparsefit.models.random": (f"def write():\n    if True:\n        {back_edge}\n", False)}  # fmt: skip
        graph = import_graph({"sparsefit": ("", True), "sparsefit.walk": ("", True), **walk, **models})
        assert find_cycle(graph) == ["sparsefit.models", "sparsefit.walk", "sparsefit.models"], back_edge


def test_no_import_cycle_between_files():
    """Within a layer too (issue 32: infer/kernel.py imported infer/sparse_linear.py inside its self-test while
    sparse_linear.py imports kernel.py at the top); an ``__init__`` counts as its package's file."""
    graph = import_graph(package_sources(), unit=str)
    assert "sparsefit.infer.layout" in graph.get("sparsefit.infer.kernel", {}), "is the file graph read?"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between files:\n" + describe(graph, cycle)
    kernel = {"sparsefit.infer.kernel": ("def check():\n    from sparsefit.infer.sparse_linear import SparseLinear\n",
                                         False),
              "sparsefit.infer.sparse_linear": ("from sparsefit.infer import kernel\n", False)}  # fmt: skip
    graph = import_graph({"sparsefit": ("", True), "sparsefit.infer": ("", True), **kernel}, unit=str)
    assert find_cycle(graph) == ["sparsefit.infer.kernel", "sparsefit.infer.sparse_linear", "sparsefit.infer.kernel"]
