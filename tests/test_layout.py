"""The layout README promises: layered packages, no import cycles, no module too long to read."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "training", "services")  # each may import only those before it
LAYER = {name: i for i, name in enumerate(PACKAGES)}
MAX_LINES = 700


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every project module `path` imports: at the top, in a function or for type checking."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in known:
                yield name


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    return {
        name: {target for target in imports(path, known) if target != name}
        for name, path in known.items()
    }


def test_packages_import_only_the_layers_below_them() -> None:
    known = modules()
    upward = [
        f"{name} -> {target}"
        for name, path in known.items()
        for target in imports(path, known)
        if LAYER[target.split(".")[0]] > LAYER[name.split(".")[0]]
    ]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    edges = graph(modules())
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_shared_never_loads_torch() -> None:
    heavy = {"torch", "transformers", "peft", "sentence_transformers"}
    offenders = []
    for name, path in modules().items():
        if not name.startswith("shared"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                roots = (
                    {a.name.split(".")[0] for a in node.names}
                    if isinstance(node, ast.Import)
                    else {(node.module or "").split(".")[0]}
                )
                offenders += [f"{name}: {r}" for r in roots & heavy]
    assert offenders == []


@pytest.mark.parametrize("folder", [*PACKAGES, "tests", "bench"])
def test_no_module_is_longer_than_the_limit(folder: str) -> None:
    long = {
        str(path.relative_to(REPO)): n
        for path in sorted((REPO / folder).rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_layout_test_sees_the_real_graph() -> None:
    """The checks above are only worth something if they find the project's imports."""
    edges = graph(modules())
    assert "services.pipeline" in edges["services.trainer"]
    assert "shared.messages" in edges["services.pipeline"]
    assert len(modules()) > 30
