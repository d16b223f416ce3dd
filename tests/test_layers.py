"""The package's floors: a module imports only from its own layer or the layers below, and
no two modules import each other, directly or round a circle (imports inside functions
and under ``TYPE_CHECKING`` count: they are dependencies all the same)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Bottom to top. Modules directly in pipeline/ are the entry points, the top floor.
LAYERS = ("core", "models", "objective", "data", "share", "eval", "train")
ENTRY = len(LAYERS)
# Entry points too large for one module: a sub-package on the top floor.
ENTRY_PACKAGES = ("doctor",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """``pipeline.<layer>.x`` -> its floor; ``pipeline.x`` (an entry point) -> the top."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else ENTRY


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # "from pkg import module"
    return {m for m in found if m in known and m != here}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def downward(edges: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import that reaches a floor above its own. The
    package root is exempt: ``import pipeline`` registers the backbones with timm."""
    return [
        f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
        for a, targets in sorted(edges.items())
        if a != "pipeline"
        for b in sorted(targets)
        if layer(b) > layer(a)
    ]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first search (each reported once per entry)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return found


def test_every_module_sits_on_a_known_floor():
    known = (*LAYERS, *ENTRY_PACKAGES)
    stray = [m for m in modules() if m.count(".") > 1 and m.split(".")[1] not in known]
    assert not stray, f"modules in a sub-package neither a layer nor an entry point: {stray}"
    for sub in known:
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and "\n" not in doc.strip(), f"pipeline/{sub}/__init__.py: one-line docstring"


def test_no_module_imports_from_a_layer_above_its_own():
    assert not downward(graph())


def test_no_import_circles():
    assert not circles(graph())


@pytest.mark.parametrize(
    "edges,kind",
    [
        ({"pipeline.core.schema": {"pipeline.objective.loss"}}, "upward"),
        (
            {
                "pipeline.train.step": {"pipeline.train.loop"},
                "pipeline.train.loop": {"pipeline.train.step"},
            },
            "circle",
        ),
    ],
)
def test_the_checks_catch_what_they_name(edges, kind):
    """The checks themselves on a made-up graph: an import from a floor above, a circle."""
    if kind == "upward":
        assert downward(edges) == [
            "pipeline.core.schema (layer 0) -> pipeline.objective.loss (layer 2)"
        ]
    else:
        assert circles(edges) == [
            ["pipeline.train.loop", "pipeline.train.step", "pipeline.train.loop"]
        ]
