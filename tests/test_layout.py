"""The package layout the README's "Layout" table states: which package may import which, no import cycles among
module-level imports, and no private name (``_x``) taken from another package. Read from the source with ``ast``;
nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the packages of ours it may import at all (module level or inside a function). A package always
# may import itself. "top" is lightning_scaling/__init__.py, which re-exports lazily and may name anything.
ALLOWED: dict[str, set[str]] = {
    "argument_checks": set(),
    "metric_names": set(),
    "lazy_imports": set(),
    "estimators": {"argument_checks"},
    "flops": {"argument_checks", "lazy_imports"},
    "laws": {"argument_checks", "metric_names", "lazy_imports"},
    "planner": {"argument_checks", "laws", "flops"},
    "run_report": {"argument_checks", "metric_names", "laws"},
    "kernels": {"flops"},
    "callbacks": {
        "argument_checks",
        "metric_names",
        "lazy_imports",
        "estimators",
        "flops",
        "laws",
        "run_report",
        "kernels",
        "top",
    },
    "commands": {"argument_checks", "laws", "flops", "planner", "run_report"},
    "cli": {"commands"},
    "_source_tree": set(),
    "data": set(),
}


def _module_name(path: Path) -> str:
    if path.is_relative_to(REPO / "kernels"):
        parts = ("lightning_scaling", "kernels", *path.relative_to(REPO / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return "top" if len(parts) == 1 else parts[1]


def _sources() -> dict[str, ast.Module]:
    files = [*sorted((REPO / "lightning_scaling").rglob("*.py")), *sorted((REPO / "kernels").rglob("*.py"))]
    return {_module_name(f): ast.parse(f.read_text(), str(f)) for f in files}


def _imports(module: str, tree: ast.Module, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for each import of ours in ``tree``."""
    found = []
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_scaling"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("lightning_scaling")]
    return found


SOURCES = _sources()


def test_every_package_is_in_the_table():
    assert {_package(m) for m in SOURCES} - {"top"} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_follow_the_layout(module):
    package = _package(module)
    if package == "top":
        return
    for imported, names in _imports(module, SOURCES[module], top_level_only=False):
        target = _package(imported)
        if imported == "lightning_scaling":  # `from lightning_scaling import x`: x is a package or a name
            targets = {n if n in ALLOWED else "top" for n in names}
        else:
            targets = {target}
        for t in targets - {package}:
            assert t in ALLOWED[package], f"{module} imports {imported} ({t}), which {package} may not import"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_private_name_from_another_package(module):
    for imported, names in _imports(module, SOURCES[module], top_level_only=False):
        if _package(imported) == _package(module):
            continue
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{module} imports private {private} from {imported}"
        assert not any(part.startswith("_") for part in imported.split(".")[2:]), (
            f"{module} imports the private module {imported} of another package"
        )


def test_no_import_cycles_at_module_level():
    graph: dict[str, set[str]] = {}
    for module, tree in SOURCES.items():
        edges = set()
        for imported, names in _imports(module, tree, top_level_only=True):
            edges.add(imported)
            edges.update(f"{imported}.{n}" for n in names if f"{imported}.{n}" in SOURCES)
        graph[module] = {e for e in edges if e in SOURCES and e != module}
    # A package's __init__ importing its own submodules is the usual re-export, not a cycle through them.
    for module in graph:
        if module in SOURCES and any(m.startswith(module + ".") for m in SOURCES):
            graph[module] = {e for e in graph[module] if not e.startswith(module + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_pure_math_imports_neither_lightning_nor_triton_nor_torch():
    pure = [
        "lightning_scaling.argument_checks",
        "lightning_scaling.metric_names",
        "lightning_scaling.planner",
        "lightning_scaling.run_report",
        "lightning_scaling.estimators.noise_scale",
        "lightning_scaling.flops.formulas",
        "lightning_scaling.flops.by_shape",
    ]
    pure += [m for m in SOURCES if m.startswith("lightning_scaling.laws")]
    for module in pure:
        for node in ast.walk(SOURCES[module]):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            heavy = [n for n in names if n.split(".")[0] in {"torch", "lightning", "triton"}]
            assert not heavy, f"{module} imports {heavy}"
