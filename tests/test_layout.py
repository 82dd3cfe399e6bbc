"""The package's shape (ARCHITECTURE.md): few entries at the top of ``worker/``, small modules,
short functions, and no import cycle at runtime (imports under ``TYPE_CHECKING`` don't count).

Pure code analysis (``ast``): nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "worker"
MAX_TOP_ENTRIES = 12  # rooms and top modules; __init__.py and py.typed are the package's markers
# Guards, not the design: modules are split where concepts part (a room per concern, a module per
# concept: the dashboard by page, the store by record / writes / scripts), never to get under a
# number. A module that reaches the limit holds more than one concept: find the seam, don't trim.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(WORKER.rglob("*.py")):
        name = ".".join(path.relative_to(WORKER.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _runtime_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The worker modules ``module`` imports when it runs (at import time or in a function)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def add(name: str) -> None:
        if name in known and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            add(base)
            for alias in node.names:
                add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_the_top_of_the_package_is_a_few_rooms() -> None:
    entries = sorted(
        p.name for p in WORKER.iterdir() if p.name not in ("__pycache__", "__init__.py", "py.typed")
    )
    assert len(entries) <= MAX_TOP_ENTRIES, entries


def test_no_module_is_over_the_limit() -> None:
    sizes = {str(p.relative_to(WORKER)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_the_limit() -> None:
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(WORKER)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_no_runtime_import_cycle() -> None:
    modules = _modules()
    graph = {name: _runtime_imports(name, path, set(modules)) for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                walk(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """The check above can fail: two modules importing each other inside functions are found."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("from pkg.a import f\n")
    known = {"pkg.a", "pkg.b"}
    assert _runtime_imports("pkg.a", tmp_path / "a.py", known) == {"pkg.b"}
    assert _runtime_imports("pkg.b", tmp_path / "b.py", known) == {"pkg.a"}
    typed = tmp_path / "c.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    assert _runtime_imports("pkg.c", typed, known | {"pkg.c"}) == set()


# The rooms of worker/queue, bottom first (ARCHITECTURE.md): a room imports only from its own
# room and the rooms below it; the modules directly in worker/queue (the worker's composition:
# app, service, tasks) may import any room. "Import" includes imports inside functions.
QUEUE_ROOMS = ("store", "broker", "events", "process", "pipeline")
# Below worker/queue: nothing here imports it (Redis clients and key names live in worker/db).
BELOW_QUEUE = ("worker.db", "worker.mail", "worker.ops", "worker.records", "worker.transports",
               "worker.settings", "worker.errors")  # fmt: skip


def _queue_level(module: str) -> int | None:
    if not module.startswith("worker.queue."):
        return None
    room = module.split(".")[2]
    return QUEUE_ROOMS.index(room) if room in QUEUE_ROOMS else len(QUEUE_ROOMS)


def _climbs(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower room of worker/queue (or from below it) up into a higher one."""
    found = []
    for name, targets in sorted(graph.items()):
        below = name.startswith(BELOW_QUEUE)
        level = _queue_level(name)
        for target in sorted(targets):
            into = _queue_level(target)
            if into is None:
                continue
            if below or (level is not None and into > level):
                found.append(f"{name} -> {target}")
    return found


def test_queue_rooms_import_only_downwards() -> None:
    modules = _modules()
    graph = {name: _runtime_imports(name, path, set(modules)) for name, path in modules.items()}
    assert {
        name.split(".")[2] for name in modules if name.count(".") >= 3 and name.startswith("worker.queue.")
    } == set(QUEUE_ROOMS)
    assert _climbs(graph) == []


def test_the_room_check_sees_a_climb() -> None:
    """The check above can fail: the store importing the pipeline, or ops importing the queue."""
    graph = {
        "worker.queue.store.jobs": {"worker.queue.pipeline.attempts", "worker.queue.store.ready"},
        "worker.queue.pipeline.attempts": {"worker.queue.store.jobs"},
        "worker.ops.health": {"worker.queue.store.jobs"},
        "worker.queue.tasks": {"worker.queue.pipeline.attempts"},
    }
    assert _climbs(graph) == [
        "worker.ops.health -> worker.queue.store.jobs",
        "worker.queue.store.jobs -> worker.queue.pipeline.attempts",
    ]


MAX_FOLDER_MODULES = 12  # modules directly in one folder (its __init__.py not counted)


def test_no_folder_holds_more_than_a_dozen_modules() -> None:
    """More than a dozen modules side by side is a room that holds several concerns: give each
    its own folder (as queue/, web/ and transports/smtp/ do)."""
    crowded = {}
    for folder in [WORKER, *(p for p in WORKER.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        modules = [p.name for p in folder.glob("*.py") if p.name != "__init__.py"]
        if len(modules) > MAX_FOLDER_MODULES:
            crowded[str(folder.relative_to(WORKER.parent))] = len(modules)
    assert crowded == {}


def test_no_module_rebinds_a_global() -> None:
    """What a process makes once lives in its one ProcessState (worker/queue/broker/process_state.py)
    or behind functools.cache, never in a module variable a function rebinds."""
    rebinds = [
        f"{path.relative_to(WORKER)}:{node.lineno} global {', '.join(node.names)}"
        for path in _modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Global)
    ]
    assert rebinds == []
