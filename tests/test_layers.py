"""The parts of ``gateway/`` import one way, in the order a request's path is built from the
bottom up, and no module imports itself back through another."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

LAYERS = [
    ["core"],  # one request's record, the error tree, ASGI types, the body's view, headers
    ["client"],  # the HTTP/1.1 client
    ["config"],  # the settings and the backends file
    ["edge"],  # the server a client meets: protocol, request cycle, CORS, draining
    ["fleet", "tenancy", "embedded"],  # backends and replicas; keys and limits; a local runtime
    ["routing"],  # which backend and replica, retries
    ["observability"],  # metrics, access log
    ["proxy"],  # one request through its phases
    ["endpoints"],  # the gateway's own: health, admin, OpenAPI
    ["app"],  # the app assembled
    ["main"],  # the command line and the processes
    ["__main__"],
]
"""Each part may import from the parts on earlier lines, never from a later or the same line."""


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(path: Path) -> set[str]:
    """Every gateway module the file imports, at any depth (type-only ones included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: a relative import")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    known = {name for name, _ in modules()}
    # ``from gateway.core import errors`` names the module; ``from gateway import __version__``,
    # the package's version, which every part may read.
    return {name for name in found if name in known and name != "gateway"}


def part(module: str) -> str:
    return module.split(".")[1]


def test_every_part_has_a_layer() -> None:
    placed = {name for layer in LAYERS for name in layer}
    top = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()}
    top -= {"__init__", "__pycache__"}
    assert top == placed


def test_parts_import_only_from_earlier_layers() -> None:
    rank = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    wrong = []
    for module, path in modules():
        if module == "gateway":
            continue
        for target in imports(path):
            here, there = part(module), part(target)
            if here != there and rank[there] >= rank[here]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_module_imports_itself_back() -> None:
    known = dict(modules())
    graph = {
        module: {target for target in imports(path) if target in known and target != module}
        for module, path in known.items()
    }
    cycles = []
    state: dict[str, int] = {}  # 1 being visited, 2 done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def sources() -> Iterator[Path]:
    yield from sorted(PACKAGE.rglob("*.py"))
    yield from sorted((ROOT / "adapters").rglob("*.py"))


def test_modules_and_functions_stay_small_enough_to_read() -> None:
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in sources()}
    assert {str(path): n for path, n in lengths.items() if n > 500} == {}
    gateway = sorted(n for path, n in lengths.items() if PACKAGE in path.parents)
    assert gateway[len(gateway) // 2] < 200
    long = []
    for path in lengths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno is None:
                continue
            if node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert long == []


def test_the_top_of_the_package_holds_about_a_dozen_entries() -> None:
    entries = [path for path in PACKAGE.iterdir() if not path.name.startswith("__")]
    assert len(entries) <= 13, sorted(path.name for path in entries)
