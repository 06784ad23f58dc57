"""The import graph of ``service/`` follows the data's path (STYLE.md, rules 1, 10, 11).

Read with ``ast`` from the source files (nothing is imported or run):

- only ``service/store/`` (and ``service/check.py``, the read-only invariant checker;
  ``migrations/`` is not in the package) imports the database driver;
- a module never imports one of a higher layer, and the graph has no circle;
- production code never imports the simulator, except the two commands that serve it
  (``simulate`` in ``service/cli.py``, ``service/demo.py``);
- no function hides an import of a service module (the CLI's per-command imports
  excepted: they keep ``--help`` fast and are no circle);
- no function of ``service/`` is longer than 60 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"

LAYERS: dict[str, int] = {
    # the base: imports nothing of the package but these
    "service": 0,
    "service.errors": 0,
    "service.vocabulary": 0,
    "service.dburl": 0,
    "service.logs": 0,
    "service.embedded": 0,
    # configuration, and the metrics every layer counts in
    "service.config": 1,
    "service.metrics": 1,
    # the API client
    "service.jdcloud": 2,
    # normalisation
    "service.normalize": 3,
    # the store (the only door to the database) and the invariant checker beside it
    "service.store": 4,
    "service.check": 4,
    # sync orchestration: ingestion, the run, the webhook delivery after commits
    "service.ingest": 5,
    "service.sync": 5,
    "service.webhooks": 5,
    # the daemon, the status server and the CLI's readers and displays
    "service.daemon": 6,
    "service.web": 6,
    "service.report": 6,
    "service.changes": 6,
    "service.progress": 6,
    "service.schema_doc": 6,
    # composition root and entry points
    "service.app": 7,
    "service.demo": 7,
    "service.cli": 7,
    "service.__main__": 7,
}
DRIVERS = ("sqlalchemy", "asyncpg", "psycopg", "alembic")
MAY_USE_DRIVERS = ("service.store", "service.check")
SERVES_SIMULATOR = ("service.cli", "service.demo")
LOCAL_IMPORTS_ALLOWED = ("service.cli",)
"""The entry point imports each command's modules when the command runs."""
SIMULATOR = "service.simulator"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = frozenset(module_name(p) for p in SERVICE.rglob("*.py"))


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    importer = module_name(path)
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(importer, a.name, child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append(Import(importer, child.module, child.lineno, local))
                # `from service.store import migrate` names a module
                found.extend(
                    Import(importer, f"{child.module}.{a.name}", child.lineno, local)
                    for a in child.names
                    if f"{child.module}.{a.name}" in MODULES
                )
            visit(child, inner)

    visit(tree, False)
    return found


def production_files() -> list[Path]:
    return sorted(p for p in SERVICE.rglob("*.py") if "simulator" not in p.parts)


def all_imports() -> list[Import]:
    return [i for path in production_files() for i in imports_of(path)]


def covers(name: str, module: str) -> bool:
    """Whether the LAYERS entry ``name`` places ``module`` (the root only itself)."""
    return module == name or (name != "service" and module.startswith(name + "."))


def layer_of(module: str) -> int:
    names = [name for name in LAYERS if covers(name, module)]
    assert names, f"{module} has no layer in LAYERS"
    return LAYERS[max(names, key=len)]


def is_service(module: str) -> bool:
    return module == "service" or module.startswith("service.")


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_module_has_a_layer() -> None:
    modules = [module_name(p) for p in production_files()]
    missing = [m for m in modules if not any(covers(n, m) for n in LAYERS)]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_only_the_store_imports_the_database_driver() -> None:
    offenders = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in all_imports()
        if i.imported.split(".")[0] in DRIVERS and not within(i.importer, MAY_USE_DRIVERS)
    ]
    assert not offenders, "SQL and the driver live in service/store/: " + "; ".join(offenders)


def test_no_module_imports_a_higher_layer() -> None:
    offenders = [
        f"{i.importer} (layer {layer_of(i.importer)}):{i.line} imports {i.imported} "
        f"(layer {layer_of(i.imported)})"
        for i in all_imports()
        if is_service(i.imported)
        and not within(i.imported, (SIMULATOR,))
        and layer_of(i.imported) > layer_of(i.importer)
    ]
    assert not offenders, "; ".join(offenders)


def test_the_import_graph_has_no_circle() -> None:
    graph: dict[str, set[str]] = {}
    modules = {module_name(p) for p in production_files()}
    for i in all_imports():
        target = i.imported
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]  # `from service.store import migrate`
        if is_service(target) and target != i.importer and target in modules:
            graph.setdefault(i.importer, set()).add(target)
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target == "service":  # the package's own __init__ (its version)
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)


def test_production_code_never_imports_the_simulator() -> None:
    offenders = [
        f"{i.importer}:{i.line}"
        for i in all_imports()
        if within(i.imported, (SIMULATOR,)) and not within(i.importer, SERVES_SIMULATOR)
    ]
    assert not offenders, "the simulator is imported by " + ", ".join(offenders)
    importers_of_demo = [
        f"{i.importer}:{i.line}"
        for i in all_imports()
        if within(i.imported, ("service.demo",)) and not i.local
    ]
    assert not importers_of_demo, "service.demo (and the simulator) loaded at import by " + (
        ", ".join(importers_of_demo)
    )


def test_no_function_hides_an_import_of_a_service_module() -> None:
    offenders = [
        f"{i.importer}:{i.line} imports {i.imported} inside a function"
        for i in all_imports()
        if i.local and is_service(i.imported) and not within(i.importer, LOCAL_IMPORTS_ALLOWED)
    ]
    assert not offenders, "; ".join(offenders)


def test_the_checker_sees_what_it_checks() -> None:
    """The walk itself: it finds top-level and function-local imports, and layers."""
    imports = imports_of(SERVICE / "cli.py")
    assert any(i.imported == "service.config" and not i.local for i in imports)
    assert any(within(i.imported, (SIMULATOR,)) and i.local for i in imports)
    assert layer_of("service.store.apply") == 4 and layer_of("service.jdcloud.client") == 2


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen() -> None:
    offenders = []
    for path in sorted(SERVICE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    offenders.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert not offenders, f"over {MAX_FUNCTION_LINES} lines: " + "; ".join(offenders)
