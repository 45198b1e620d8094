"""The architecture as a test: p2pdl's layers (docs/ARCHITECTURE.md) import only downwards.

Each top-level module or sub-package of ``p2pdl`` has a layer; a module may import its own layer
or lower ones, never a higher one, and the import graph has no circle. Imports inside functions
count too: a lazy import that goes up is still a circle waiting to happen.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "p2pdl"

# Bottom-up, as in docs/ARCHITECTURE.md.
LAYERS: dict[str, int] = {
    "errors": 0,
    "tasks": 0,
    "_malloc": 0,
    "faults": 0,
    "core": 1,
    "config": 2,
    "wire": 3,
    "compression": 4,
    "net": 5,
    "obs": 6,
    "membership": 7,
    "strategies": 8,
    "peer": 9,
    "train": 10,
    "cli": 11,
    "__init__": 12,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("p2pdl"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("p2pdl"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_of_the_package_has_a_layer() -> None:
    unplaced = {top(module) for module in graph()} - set(LAYERS)
    assert not unplaced, f"add these to LAYERS and to docs/ARCHITECTURE.md: {sorted(unplaced)}"


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"{module} (layer {LAYERS[top(module)]}) imports {target} (layer {LAYERS[top(target)]})"
        for module, targets in graph().items()
        for target in targets
        if target != "p2pdl" and LAYERS[top(target)] > LAYERS[top(module)]
    ]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle() -> None:
    edges = graph()
    modules = set(edges)

    def resolve(target: str) -> str | None:
        # "from p2pdl.wire import Frame" names the package; "from p2pdl.wire.frame import X" a module.
        return target if target in modules else None

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            resolved = resolve(target)
            if resolved is None or resolved == module:
                continue
            if state.get(resolved) == 1:
                circle = [*path[path.index(resolved) :], resolved]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if resolved not in state:
                visit(resolved)
        path.pop()
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module)


def test_the_architecture_document_names_every_layer() -> None:
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [name for name in LAYERS if name not in ("_malloc", "__init__") and f"`{name}" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"
