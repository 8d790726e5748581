"""The house's layout, read from the source with `ast` (function-local imports included,
`if TYPE_CHECKING:` blocks excepted): each room imports only the rooms below it, no import
cycle anywhere, export and serve free of training code, and no module too long to live in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "benchmarks", "docs", "runs", "build", "dist"}

# Room -> the rooms it may import (besides itself). A room is a top-level module or package.
BASE = {"io", "config", "method_table"}
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "config": {"io", "method_table"},
    "method_table": set(),
    "kernels": set(),
    "runtime": BASE,
    "models": BASE | {"runtime"},
    "evaluation": BASE | {"kernels", "runtime"},
    "data": BASE | {"runtime", "evaluation"},
    "run": BASE | {"runtime", "models", "evaluation", "data"},
    "methods": BASE | {"kernels", "runtime", "models", "evaluation", "data", "run"},
    "training": BASE | {"kernels", "runtime", "models", "evaluation", "data", "run", "methods"},
    "experiments": BASE | {"runtime", "models", "evaluation", "data", "run", "methods"},
    "export": BASE | {"runtime", "models", "evaluation", "data", "run"},
    "review": BASE | {"runtime", "models", "evaluation", "data", "run", "export"},
    "serve": BASE | {"runtime", "models", "run", "export"},
    "recipes": BASE,
}
EDGE = {"commands", "cli", "demo", "__main__", "__init__"}  # compose everything
# Hand-written modules stay readable; the trainer stays a loop's entry point.
MAX_LINES, MAX_TRAINER_LINES = 600, 400


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIP or any(p.startswith(".") for p in parts):
            continue
        name = ".".join(parts)[:-3].removesuffix(".__init__")
        found[name] = path
    return found


def type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skipped


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the longest existing prefix of each name)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for full in names:
                if full.startswith("noisyseg."):
                    target = resolve(full.removeprefix("noisyseg."))
                    if target and target != name:
                        targets.add(target)
        edges[name] = targets
    return edges


def room(module: str) -> str:
    return module.split(".")[0]


def test_every_room_imports_only_the_rooms_below_it() -> None:
    edges = imports(modules())
    wrong = sorted(
        f"{a} -> {b}"
        for a, targets in edges.items()
        for b in targets
        if room(a) not in EDGE and room(b) != room(a) and room(b) not in ALLOWED[room(a)]
    )
    unknown = sorted({room(m) for m in edges} - set(ALLOWED) - EDGE)
    assert not unknown, f"rooms missing from the layers table: {unknown}"
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    edges = imports(modules())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("part", ["export", "serve"])
def test_export_and_serve_import_no_training_code(part: str) -> None:
    edges = imports(modules())
    training_rooms = {"training", "methods", "experiments"}
    found = sorted(f"{a} -> {b}" for a, t in edges.items() if room(a) == part for b in t if room(b) in training_rooms)
    assert not found


def test_modules_stay_readable() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    generated = {name for name in sizes if name.endswith("_pb2") or name.endswith("_pb2_grpc")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in generated}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    assert sizes["training.trainer"] <= MAX_TRAINER_LINES and sizes["training.loop"] <= MAX_LINES
